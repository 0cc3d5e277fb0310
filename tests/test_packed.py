"""Packed checkpoints and the real-quant runtime on tiny random models of every architecture (CPU reference ops)."""

import copy
import json
import os

import numpy as np
import pytest
import torch
from conftest import ARCHS, tiny_model
from transformers import DynamicCache

import flatquant as fq
from flatquant import runtime
from flatquant.kernels.silu_mul import FusedGatedMLP
from flatquant.kvcache import Int4KVCache, cache_kwargs
from flatquant.packed import CONFIG_FILE, TENSORS_FILE, load_packed, pack

_TOKENS = torch.randint(0, 128, (4, 32), generator=torch.Generator().manual_seed(1))


def _quantized(arch: str, method: str = "flatquant", **overrides):
    model = tiny_model(arch, **overrides)
    cfg = fq.FlatQuantConfig(method=method, nsamples=4, seqlen=32, epochs=1, autocast_dtype="float32")
    fq.quantize(model, cfg, _TOKENS, device="cpu", progress=False)
    return model


@pytest.fixture(scope="module")
def asym_packed(tmp_path_factory):
    """(fake-quant llama calibrated with asymmetric activations, its packed folder)."""
    model = tiny_model("llama")
    cfg = fq.FlatQuantConfig(nsamples=4, seqlen=32, epochs=1, autocast_dtype="float32", a_symmetric=False)
    fq.quantize(model, cfg, _TOKENS, device="cpu", progress=False)
    return model, pack(model, str(tmp_path_factory.mktemp("asym") / "packed"))


@pytest.fixture(scope="module")
def packed(tmp_path_factory):
    """arch -> (fake-quant merged model, real-quant model loaded from its packed checkpoint, folder)."""
    out = {}
    for arch in sorted(ARCHS):
        model = _quantized(arch)
        path = str(tmp_path_factory.mktemp(arch) / "packed")
        pack(model, path)
        out[arch] = (model, load_packed(path, device="cpu"), path)
    return out


@pytest.mark.parametrize("arch", sorted(ARCHS))
@torch.no_grad()
def test_real_quant_logits_match_the_fake_quant_model(packed, arch):
    fake, real, _ = packed[arch]
    a, b = fake(_TOKENS).logits, real(_TOKENS).logits
    # Same codes by contract; what differs is the fp32 summation order of the online transform and the
    # dequantization (integer GEMM in float64 vs fake-quant weights and activations in fp32), a few fp32 ulps.
    # A code could flip where x / scale lies within such an error of a half-integer; none does here.
    torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
    assert (a - tiny_model(arch)(_TOKENS).logits).abs().max() > 1e-3  # quantization really is in both
    assert all(isinstance(layer.mlp, FusedGatedMLP) for layer in real.model.layers)  # SiLU * up: one launch


def test_checkpoint_files_hold_packed_weights_and_a_versioned_config(packed):
    model, real, path = packed["qwen2"]
    assert sorted(os.listdir(path)) == sorted([CONFIG_FILE, TENSORS_FILE])
    assert not [n for n in os.listdir(os.path.dirname(path)) if n.startswith(".flatquant")]  # no temp folder left
    meta = json.load(open(os.path.join(path, CONFIG_FILE)))
    assert (meta["format"], meta["format_version"], meta["bits"]) == ("flatquant-packed", 1, dict(w=4, a=4, k=4, v=4))
    assert meta["transforms"]["qkv"] == [8, 8] and meta["transforms"]["o"] == [4, 16]
    from safetensors.torch import load_file

    t = load_file(os.path.join(path, TENSORS_FILE))
    q = "model.layers.0.self_attn.q_proj"
    assert t[f"{q}.w_packed"].dtype == torch.uint8 and t[f"{q}.w_packed"].shape == (64, 32)
    assert f"{q}.bias" in t and f"{q}.weight" not in t  # qwen2 q/k/v biases; no full-precision weight
    assert torch.equal(t["model.layers.0.self_attn.o_proj.p2"], torch.eye(16))  # P_o ⊗ I
    assert not any(isinstance(m, torch.nn.Linear) for m in real.model.layers.modules())
    with pytest.raises(FileExistsError, match="exists"):
        pack(model, path)


def test_load_rejects_other_formats_and_missing_tensors(packed, tmp_path):
    _, _, path = packed["llama"]
    with pytest.raises(FileNotFoundError, match="not a packed"):
        load_packed(str(tmp_path), device="cpu")
    bad = tmp_path / "bad"
    bad.mkdir()
    meta = json.load(open(os.path.join(path, CONFIG_FILE)))
    (bad / CONFIG_FILE).write_text(json.dumps({**meta, "format_version": 99}))
    (bad / TENSORS_FILE).write_bytes(open(os.path.join(path, TENSORS_FILE), "rb").read())
    with pytest.raises(ValueError, match="v99"):
        load_packed(str(bad), device="cpu")
    from safetensors.torch import load_file, save_file

    t = load_file(os.path.join(path, TENSORS_FILE))
    del t["model.layers.1.mlp.down_proj.w_scale"]
    (bad / CONFIG_FILE).write_text(json.dumps(meta))
    save_file(t, str(bad / TENSORS_FILE))
    with pytest.raises(ValueError, match="lacks 1 tensors.*down_proj.w_scale"):
        load_packed(str(bad), device="cpu")


def test_pack_refuses_unmerged_and_unsupported_models(tmp_path):
    with pytest.raises(ValueError, match="calibrated, merged model"):
        pack(tiny_model("llama"), str(tmp_path / "x"))
    model = tiny_model("llama")
    fq.quantize(model, fq.FlatQuantConfig(method="rtn", w_bits=8), device="cpu", progress=False)
    with pytest.raises(ValueError, match="w_bits"):
        pack(model, str(tmp_path / "y"))
    assert not os.path.exists(tmp_path / "y")
    model = tiny_model("llama")
    cfg = fq.FlatQuantConfig(method="rtn", overrides={"down_proj": {"w_bits": 8, "a_bits": 8}})
    fq.quantize(model, cfg, device="cpu", progress=False)
    with pytest.raises(ValueError, match="overrides"):  # mixed precision has no packed layout yet
        pack(model, str(tmp_path / "z"))


@torch.no_grad()
def _greedy_without_cache(model, ids, steps):
    for _ in range(steps):
        nxt = model(ids, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
        ids = torch.cat([ids, nxt], dim=1)
    return ids


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_greedy_generate_with_the_int4_cache_equals_a_loop_without_cache(packed, arch, monkeypatch):
    _, real, _ = packed[arch]
    calls, decode = [], runtime.decode_attention
    monkeypatch.setattr(runtime, "decode_attention", lambda *a, **k: calls.append(1) or decode(*a, **k))
    ids = _TOKENS[:2, :12]
    cache = Int4KVCache(real, min_capacity=4)  # small: the storage is regrown by doubling on the way
    out = real.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=10, do_sample=False,
                        **cache_kwargs(real, cache))  # fmt: skip
    assert torch.equal(out, _greedy_without_cache(real, ids, 10))
    layers = real.config.num_hidden_layers
    assert len(calls) == 9 * layers  # every step after the prefill read the 4-bit cache directly
    assert cache.get_seq_length() == 21 and cache.layers[0].capacity == 32


@torch.no_grad()
def test_prefill_through_the_cache_gives_the_plain_forward_logits_exactly(packed):
    _, real, _ = packed["qwen3"]
    plain = real(_TOKENS, use_cache=False).logits
    cached = real(_TOKENS, **cache_kwargs(real, Int4KVCache(real))).logits
    assert torch.equal(cached, plain)  # SDPA on the dequantized cache = SDPA on fake-quantized K/V


def test_sampling_with_the_cache_draws_what_a_cacheless_run_draws(packed):
    _, real, _ = packed["mistral"]
    ids = _TOKENS[:2, :8]
    kw = dict(attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=True, top_k=0, temperature=1.0)
    torch.manual_seed(7)
    with_cache = real.generate(ids, **kw, **cache_kwargs(real, Int4KVCache(real)))
    torch.manual_seed(7)
    without = real.generate(ids, **kw, use_cache=False)
    assert torch.equal(with_cache, without) and with_cache.shape == (2, 16)


def test_top_p_keeps_the_smallest_most_likely_set_reaching_p():
    from flatquant.kvcache import top_p_filter

    g = torch.Generator().manual_seed(3)
    logits = torch.randn(4, 50, generator=g)
    logits[0, :3] = 30.0  # a row whose cumulative float32 sum reaches 1 before its tail
    assert torch.equal(top_p_filter(logits, 1.0), logits)  # top_p = 1 keeps everything
    for p in (1e-9, 0.3, 0.9, 0.999999):
        got = torch.isfinite(top_p_filter(logits, p))
        for row, kept in zip(logits.double(), got, strict=True):  # float64 reference: add tokens until p is reached
            probs = torch.softmax(row, -1)
            order = torch.argsort(probs, descending=True)
            k = int((torch.cumsum(probs[order], 0) < p).sum()) + 1
            expected = torch.zeros(50, dtype=torch.bool)
            expected[order[: min(k, 50)]] = True
            assert torch.equal(kept, expected), p


@torch.no_grad()
def test_generate_takes_eos_lists_top_p_and_refuses_float_ids(packed):
    _, real, _ = packed["llama"]
    ids = _TOKENS[:2, :6]
    greedy = fq.generate(real, ids, 6, use_graph=False)
    nucleus = fq.generate(real, ids, 6, use_graph=False, do_sample=True, top_p=1e-9, generator=torch.Generator())
    assert torch.equal(nucleus, greedy)  # only the most likely token is left
    eos = [int(greedy[0, 7]), int(greedy[1, 9])]  # two ids: a sequence stops at the first of either
    stops = [next((t for t in range(6, 12) if int(greedy[b, t]) in eos), 11) for b in range(2)]
    expected = greedy[:, : max(stops) + 1].clone()
    for b, t in enumerate(stops):
        expected[b, t + 1 :] = eos[0]  # a finished sequence continues with the first eos id
    assert torch.equal(fq.generate(real, ids, 6, use_graph=False, eos_token_id=eos), expected)
    assert torch.equal(fq.generate(real, ids, 6, use_graph=False, eos_token_id=torch.tensor(eos)), expected)
    one = fq.generate(real, ids, 6, use_graph=False, eos_token_id=eos[0])
    assert torch.equal(fq.generate(real, ids, 6, use_graph=False, eos_token_id=np.int64(eos[0])), one)
    with pytest.raises(ValueError, match="integer token ids"):
        fq.generate(real, ids.float(), 2, use_graph=False)
    with pytest.raises(ValueError, match="top_p"):
        fq.generate(real, ids, 2, use_graph=False, do_sample=True, top_p=1.5)
    with pytest.raises(ValueError, match="eos_token_id"):
        fq.generate(real, ids, 2, use_graph=False, eos_token_id=[])


def test_cache_bytes_are_about_four_times_smaller_than_bf16(tmp_path):
    # head_dim 128 as in Llama: per (token, head) 64 code bytes + fp32 scale and zero against 256 bf16 bytes
    model = _quantized("qwen3", method="rotation", head_dim=128)  # fixed transforms: no training needed
    pack(model, str(tmp_path / "p"))
    real = load_packed(str(tmp_path / "p"), device="cpu")
    cache, dense = Int4KVCache(real), DynamicCache()
    with torch.no_grad():
        real(_TOKENS, **cache_kwargs(real, cache))
        real(_TOKENS, **cache_kwargs(real, dense))  # the dense cache of the same tokens: its elements at 2 bytes
    bf16 = sum(2 * (layer.keys.numel() + layer.values.numel()) for layer in dense.layers)
    assert cache.nbytes() * 3.5 < bf16 < cache.nbytes() * 3.6  # 256 / 72 = 3.56
    assert cache.nbytes(used=False) == cache.nbytes() * 256 // 32  # capacity 256, 32 tokens used


def test_cli_packs_a_saved_calibration_and_evaluates_fake_and_real_quant(tmp_path, monkeypatch, capsys):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from flatquant import cli

    tok = Tokenizer(models.WordLevel({f"w{i}": i for i in range(128)}, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok)
    text = tmp_path / "text.txt"
    text.write_text(" ".join(f"w{(i * 7) % 128}" for i in range(200)))
    fq.save_quantized(_quantized("llama"), str(tmp_path / "calib"))
    monkeypatch.setattr(cli, "load_model", lambda name, dtype=None: (tiny_model("llama"), tokenizer))
    monkeypatch.setattr(cli, "load_tokenizer", lambda name: tokenizer)
    # the default model's generation config is not read: this test must not need the default model installed
    monkeypatch.setattr(cli, "eos_token_ids", lambda name, tok: [i for i in [tok.eos_token_id] if i is not None])
    common = ["--eval-data", str(text), "--eval-seqlen", "64", "--device", "cpu", "--quiet"]
    results, out = tmp_path / "r.json", str(tmp_path / "packed")
    argv = ["pack", "--checkpoint", str(tmp_path / "calib"), "--output", out, "--results-json", str(results)]
    assert cli.main(argv + common) == 0
    model = tiny_model("llama")  # the size line: packed tensors against the model's weights at 16 bits
    numel = sum(p.numel() for p in model.parameters())
    ends = {id(m.weight): m.weight.numel() for m in (model.get_input_embeddings(), model.get_output_embeddings())}
    packed_bytes = os.path.getsize(os.path.join(out, "model.safetensors"))
    printed = capsys.readouterr().out
    ratio, kib = 2 * numel / packed_bytes, 2 * numel / 1024
    assert f"{ratio:.2f}x smaller than the weights at 16 bits ({kib:.2f} KiB)" in printed
    head = f"{4 * sum(ends.values()) / 1024:.2f} KiB of them are the input embedding and lm_head, kept in 32 bits"
    assert head in printed  # an fp32 model packs them in fp32
    fake, real = json.loads(results.read_text())
    assert (fake["method"], real["method"], real["w_bits"]) == ("flatquant", "packed", 4)
    assert fake["calib"] is None and real["calib"] is None  # calibrated elsewhere (the checkpoint)
    assert "calib" not in json.loads((tmp_path / "packed" / "flatquant-packed.json").read_text())["metadata"]
    assert real["text_ppl"] == pytest.approx(fake["text_ppl"], rel=1e-5)
    assert cli.main(["eval", "--packed", out, "--results-json", str(results)] + common) == 0
    assert json.loads(results.read_text())[-1]["text_ppl"] == real["text_ppl"]
    assert cli.main(argv + common) == 2  # exists: refused without --overwrite
    gen = ["generate", "--packed", out, "--prompt", "w1 w2 w3", "--prompt", "w5", "--max-new-tokens", "4"]
    assert cli.main(gen + ["--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    assert printed.count("tokens/s") == 2 and "w1 w2 w3" in printed
    assert cli.main(gen + ["--device", "cpu", "--max-new-tokens", "0"]) == 2  # a clear error, no traceback
    assert cli.main(["generate", "--packed", str(tmp_path / "nothing"), "--prompt", "w1"]) == 2


@pytest.mark.parametrize(
    "device",
    ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"))],
)
@pytest.mark.parametrize("act_symmetric", [True, False])
def test_bf16_packed_model_tracks_fake_quant_and_decodes_from_the_cache(packed, asym_packed, device, act_symmetric):
    """On CUDA this runs the fused kernels (transform+quantize, W4A4 GEMM, INT4 decode attention)."""
    fake, path = packed["llama"][::2] if act_symmetric else asym_packed
    with torch.no_grad():
        _check_bf16_packed(fake, path, device)


def _check_bf16_packed(fake, path, device):
    real = load_packed(path, device=device, dtype=torch.bfloat16)
    ids = _TOKENS.to(device)
    exact = copy.deepcopy(fake).to(device)(ids).logits.float()
    fake_bf16 = copy.deepcopy(fake).to(device, torch.bfloat16)(ids).logits.float()
    out = real(ids).logits.float()
    # bf16 flips codes at rounding boundaries, and on a tiny random model each flip moves the logits a lot
    # (the fake-quant model itself lands ~10% away from its fp32 logits in bf16). The runtime must add no
    # error of its own: the packed bf16 model is no further from the fp32 logits than fake quant in bf16.
    bf16_err = ((fake_bf16 - exact).norm() / exact.norm()).item()
    assert (out - exact).norm() / exact.norm() < 1.25 * bf16_err + 0.01
    cache = Int4KVCache(real)
    real(ids[:, :-1], **cache_kwargs(real, cache))
    step = real(ids[:, -1:], **cache_kwargs(real, cache)).logits[:, -1].float()  # decode from the INT4 cache
    last_err = ((fake_bf16[:, -1] - exact[:, -1]).norm() / exact[:, -1].norm()).item()
    assert (step - exact[:, -1]).norm() / exact[:, -1].norm() < 1.25 * last_err + 0.01


def test_load_builds_on_the_meta_device_before_loading_tensors(packed, monkeypatch):
    from flatquant import packed as packed_module

    seen, build = [], packed_module.AutoModelForCausalLM.from_config

    def spy(*args, **kwargs):
        model = build(*args, **kwargs)
        seen.append({p.device.type for p in model.parameters()})
        return model

    monkeypatch.setattr(packed_module.AutoModelForCausalLM, "from_config", spy)
    real = load_packed(packed["qwen3"][2], device="cpu")
    assert seen == [{"meta"}]  # the full-precision model never had memory
    assert {t.device.type for t in list(real.parameters()) + list(real.buffers())} == {"cpu"}


@torch.no_grad()
def test_pack_in_bfloat16_stores_16_bit_tensors_and_loads_as_a_cast_at_load_time(packed, tmp_path):
    fake, _, path32 = packed["llama"]
    path16 = pack(fake, str(tmp_path / "bf16"), dtype="bfloat16")
    meta = json.load(open(os.path.join(path16, CONFIG_FILE)))
    assert meta["dtype"] == "bfloat16"
    from safetensors.torch import load_file

    t16, t32 = load_file(os.path.join(path16, TENSORS_FILE)), load_file(os.path.join(path32, TENSORS_FILE))
    assert t16.keys() == t32.keys()
    for k, v in t16.items():
        keep32 = k.endswith(("w_scale", "act_clip", "k_clip", "v_clip", "p_h", "p_h_inv"))
        want = t32[k].dtype if not t32[k].is_floating_point() or keep32 else torch.bfloat16
        assert v.dtype == want, k
    size = {p: os.path.getsize(os.path.join(p, TENSORS_FILE)) for p in (path16, path32)}
    assert size[path16] < 0.75 * size[path32]  # tiny model: embeddings dominate
    a = load_packed(path16, device="cpu")(_TOKENS).logits
    b = load_packed(path32, device="cpu", dtype=torch.bfloat16)(_TOKENS).logits
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    with pytest.raises(ValueError, match="dtype='int8' is not one of"):
        pack(fake, str(tmp_path / "bad"), dtype="int8")
    assert not os.path.exists(tmp_path / "bad")


def test_load_and_run_under_inference_mode(asym_packed):
    """A model loaded and run under torch.inference_mode (its buffers are inference tensors, which keep no version
    counter) gives the logits of one loaded and run under no_grad, asymmetric activations and P_h casts included."""
    _, path = asym_packed
    with torch.no_grad():
        want = load_packed(path, device="cpu", dtype=torch.bfloat16)(_TOKENS).logits
    with torch.inference_mode():
        real = load_packed(path, device="cpu", dtype=torch.bfloat16)
        assert next(real.buffers()).is_inference()
        got = real(_TOKENS).logits
        again = real(_TOKENS).logits  # the cached P_h casts are reused
    assert torch.equal(got, want) and torch.equal(again, want)


def test_asymmetric_activations_pack_and_match_the_fake_quant_model(asym_packed):
    model, path = asym_packed
    assert json.load(open(os.path.join(path, CONFIG_FILE)))["transforms"]["act_symmetric"] is False
    real = load_packed(path, device="cpu")
    with torch.no_grad():
        a, b = real(_TOKENS).logits, model(_TOKENS).logits
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert (b - tiny_model("llama")(_TOKENS).logits).abs().max() > 1e-3  # quantization really is in both


@pytest.mark.parametrize("arch", sorted(ARCHS))
@torch.no_grad()
def test_fused_shared_input_gemms_equal_one_gemm_per_linear(packed, arch):
    """load_packed runs q/k/v and gate/up as one GEMM each (column slices); the integer GEMM makes every output
    column independent of the others, so the logits equal those of one GEMM per linear exactly."""
    from flatquant.kernels import w4a4_linear

    _, fused, path = packed[arch]
    plain = load_packed(path, device="cpu", fuse=False)
    layer = fused.model.layers[0]
    assert layer.self_attn.qkv_quant.w_packed.shape[0] == sum(
        getattr(layer.self_attn, n).out_features for n in ("q_proj", "k_proj", "v_proj")
    )
    storage = layer.self_attn.qkv_quant.w_packed.untyped_storage().data_ptr()
    assert layer.self_attn.k_proj.w_packed.untyped_storage().data_ptr() == storage  # a view: no second copy
    calls = []
    real_gemm = w4a4_linear.w4a4_gemm
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(w4a4_linear, "w4a4_gemm", lambda *a, **k: calls.append(1) or real_gemm(*a, **k))
        a = fused(_TOKENS).logits
        n_fused, calls[:] = len(calls), []
        b = plain(_TOKENS).logits
    assert n_fused == 4 * len(fused.model.layers) and len(calls) == 7 * len(plain.model.layers)  # qkv, o, gu, down
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    cache = Int4KVCache(fused)
    fused(_TOKENS[:, :-1], **cache_kwargs(fused, cache))
    step = fused(_TOKENS[:, -1:], **cache_kwargs(fused, cache)).logits[:, -1]
    torch.testing.assert_close(step, a[:, -1], rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_static_cache_decoder_steps_equal_the_regular_cache(packed):
    """The static path (device-side lengths and append positions: what a CUDA graph replays) gives the regular
    INT4 cache's decode logits; on a GPU the same steps also run from a captured graph."""
    from flatquant.kvcache import GraphedDecoder

    _, real, _ = packed["llama"]
    prompt, steps = _TOKENS[:, :20], 6
    ref_cache, cache = Int4KVCache(real), Int4KVCache(real)
    ref_logits = real(prompt, **cache_kwargs(real, ref_cache)).logits[:, -1]
    logits = real(prompt, **cache_kwargs(real, cache)).logits[:, -1]
    with pytest.raises(ValueError, match="below the 20 tokens"):
        cache.make_static(10)
    cache.make_static(prompt.shape[1] + steps + 3)
    dec = GraphedDecoder(real, cache, use_graph=False)
    for _ in range(steps):
        nxt = ref_logits.argmax(-1, keepdim=True)
        ref_logits = real(nxt, **cache_kwargs(real, ref_cache)).logits[:, -1]
        logits = dec.step(nxt)
        torch.testing.assert_close(logits, ref_logits, rtol=0, atol=0)
    assert cache.get_seq_length() == ref_cache.get_seq_length() == prompt.shape[1] + steps
    assert (cache.layers[0].lens == prompt.shape[1] + steps).all()
    chunk = _TOKENS[:, 20:22]  # two tokens at once take the regular path; the device lengths follow
    torch.testing.assert_close(
        real(chunk, **cache_kwargs(real, cache)).logits, real(chunk, **cache_kwargs(real, ref_cache)).logits
    )
    nxt = _TOKENS[:, 22:23]
    torch.testing.assert_close(dec.step(nxt), real(nxt, **cache_kwargs(real, ref_cache)).logits[:, -1])
    assert (cache.layers[-1].lens == prompt.shape[1] + steps + 3).all()
    with pytest.raises(RuntimeError, match="static INT4 cache is full"):
        dec.step(nxt)
    with pytest.raises(RuntimeError, match="needs a static cache"):
        GraphedDecoder(real, Int4KVCache(real))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (graph capture)")
@torch.no_grad()
def test_graphed_decoder_replays_equal_eager_static_steps(packed):
    from flatquant.kvcache import GraphedDecoder

    _, _, path = packed["llama"]
    real = load_packed(path, device="cuda", dtype=torch.bfloat16)
    prompt, steps = _TOKENS[:, :20].cuda(), 6
    outs = []
    for use_graph in (False, True):
        cache = Int4KVCache(real)
        logits = real(prompt, **cache_kwargs(real, cache)).logits[:, -1]
        cache.make_static(prompt.shape[1] + steps)
        dec = GraphedDecoder(real, cache, use_graph=use_graph)
        seq = []
        for _ in range(steps):
            logits = dec.step(logits.argmax(-1, keepdim=True)).clone()
            seq.append(logits)
        outs.append(torch.stack(seq))
        assert (cache.layers[0].lens == prompt.shape[1] + steps).all()
    assert dec.graph is not None
    torch.testing.assert_close(outs[1], outs[0], rtol=0, atol=0)


@pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.get_device_capability() < (9, 0),
    reason="needs a GPU of compute capability 9.0+ (programmatic dependent launch)",
)
@torch.no_grad()
def test_graphed_decode_with_programmatic_dependent_launch_equals_serial_launches(packed, monkeypatch):
    """Every kernel of a decode step (norm + transform + quantize, GEMMs, RoPE, KV append, attention and its
    merge, SiLU x mul) waits for its predecessor before it reads that one's output: steps replayed from a CUDA
    graph with PDL give the logits of the same steps without it, bit for bit (a missing wait reads stale data)."""
    from flatquant.kernels import pdl
    from flatquant.kvcache import GraphedDecoder

    if not pdl.triton_has_pdl():
        pytest.skip("this Triton has no grid dependency control")
    _, _, path = packed["llama"]
    real = load_packed(path, device="cuda", dtype=torch.bfloat16)
    prompt, steps = _TOKENS[:, :20].cuda(), 6
    outs = []
    for on in (False, True):
        monkeypatch.setattr(pdl, "ENABLED", on)
        cache = Int4KVCache(real)
        logits = real(prompt, **cache_kwargs(real, cache)).logits[:, -1]
        cache.make_static(prompt.shape[1] + steps)
        dec = GraphedDecoder(real, cache)
        seq = []
        for _ in range(steps):
            logits = dec.step(logits.argmax(-1, keepdim=True)).clone()
            seq.append(logits)
        outs.append(torch.stack(seq))
        assert dec.graph is not None
    torch.testing.assert_close(outs[1], outs[0], rtol=0, atol=0)


def test_generate_with_graph_decoding_equals_transformers_generate(packed):
    """fq.generate (static INT4 cache, decode steps through GraphedDecoder: eager here, graphs on CUDA) picks the
    same greedy tokens as transformers' generate with the regular INT4 cache; eos ends and pads sequences."""
    _, real, _ = packed["mistral"]
    ids = _TOKENS[:3, :9]
    want = real.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False,
                         **cache_kwargs(real, Int4KVCache(real)))  # fmt: skip
    got = fq.generate(real, ids, 8)
    assert torch.equal(got, want)
    eos = int(want[0, 11])  # the third new token of the first sequence
    short = fq.generate(real, ids, 8, eos_token_id=eos)
    first = [int(torch.nonzero(row[9:] == eos)[0]) if (row[9:] == eos).any() else None for row in want]
    for row, f, full in zip(short, first, want, strict=True):
        n = 8 if f is None else f + 1
        assert torch.equal(row[: 9 + n], full[: 9 + n])  # identical up to and including the first eos
        assert (row[9 + n :] == eos).all()  # then eos only
    sampled = [fq.generate(real, ids, 5, do_sample=True, top_k=5, generator=torch.Generator().manual_seed(3))
               for _ in range(2)]  # fmt: skip
    assert torch.equal(sampled[0], sampled[1]) and sampled[0].shape == (3, 14)
    with pytest.raises(ValueError, match="max_new_tokens must be >= 1"):
        fq.generate(real, ids, 0)


@torch.no_grad()
def test_moving_a_fused_model_keeps_the_consumer_weights_views(packed, tmp_path):
    """A device or dtype move converts the concatenated q/k/v and gate/up weights once; the consumers' buffers
    stay views of them (no second copy), and the model computes the same."""
    _, _, path = packed["qwen2"]
    model = load_packed(path, device="cpu")
    before = model(_TOKENS).logits
    model._apply(lambda t: t.clone())  # what .to(other_device) does to every tensor
    attn = model.model.layers[0].self_attn
    for name in ("q_proj", "k_proj", "v_proj"):
        lin = getattr(attn, name)
        for buf in ("w_packed", "w_scale", "bias"):
            shared = getattr(attn.qkv_quant, buf)
            assert getattr(lin, buf).untyped_storage().data_ptr() == shared.untyped_storage().data_ptr()
    torch.testing.assert_close(model(_TOKENS).logits, before, rtol=0, atol=0)


@torch.no_grad()
def test_static_decode_reads_device_lengths_only(packed, monkeypatch):
    """What a graph replay sees, on the CPU: the host lengths stay at their capture-time value and transformers
    materialises the causal mask (it cannot skip it while a CUDA stream is capturing). Static steps must still
    equal the regular cache's, reading positions and lengths from the device only."""
    import transformers.masking_utils as masking_utils

    from flatquant.kvcache import GraphedDecoder

    _, real, _ = packed["llama"]
    prompt, steps = _TOKENS[:, :20], 4
    ref_cache, cache = Int4KVCache(real), Int4KVCache(real)
    refs = [real(prompt, **cache_kwargs(real, ref_cache)).logits[:, -1]]
    for _ in range(steps):  # the regular cache's steps, masks skipped as usual
        refs.append(real(refs[-1].argmax(-1, keepdim=True), **cache_kwargs(real, ref_cache)).logits[:, -1])
    real(prompt, **cache_kwargs(real, cache))
    cache.make_static(prompt.shape[1] + steps)
    dec = GraphedDecoder(real, cache, use_graph=False)
    if not hasattr(masking_utils, "_ignore_causal_mask_sdpa"):
        pytest.skip("this transformers decides on the SDPA mask elsewhere")
    monkeypatch.setattr(masking_utils, "_ignore_causal_mask_sdpa", lambda *a, **k: False)  # as while capturing
    for i in range(steps):
        logits = dec.step(refs[i].argmax(-1, keepdim=True))
        for layer in cache.layers:  # a replay runs no host code: the host length stays at the prompt's
            layer.length = prompt.shape[1]
        torch.testing.assert_close(logits, refs[i + 1], rtol=0, atol=0)
    assert (cache.layers[0].lens == prompt.shape[1] + steps).all()


def test_p_h_is_cast_once_and_recast_when_the_buffer_changes():
    kvq = runtime.KVQuant(head_dim=8, has_p_h=True)
    with torch.no_grad():
        kvq.p_h.copy_(torch.randn(8, 8, generator=torch.Generator().manual_seed(0)))
    k = torch.randn(1, 2, 3, 8, dtype=torch.bfloat16)
    first = kvq._in_dtype("p_h", torch.bfloat16)
    assert kvq._in_dtype("p_h", torch.bfloat16) is first  # reused: no cast kernel per call
    assert torch.equal(kvq.transform_key(k), k @ kvq.p_h.to(torch.bfloat16))
    with torch.no_grad():
        kvq.p_h.mul_(2)  # rewritten in place (e.g. load_state_dict): the cast follows
    assert torch.equal(kvq.transform_key(k), k @ kvq.p_h.to(torch.bfloat16))
    kvq.double()  # moved / converted: a new buffer object
    assert torch.equal(kvq.transform_key(k), k @ kvq.p_h.to(torch.bfloat16))
    assert kvq._in_dtype("p_h", torch.float64) is kvq.p_h


def test_head_rows_matmul_equals_matmul_without_flattening_copies():
    g = torch.Generator().manual_seed(2)
    mem = torch.randn(2, 7, 3, 16, generator=g, dtype=torch.float64)  # (B, T, H, D), as a projection writes it
    m = torch.randn(16, 16, generator=g, dtype=torch.float64)
    x = mem.transpose(1, 2)  # (B, H, T, D) view, as the attention forward hands q and k on
    out = runtime.head_rows_matmul(x, m)
    assert out.shape == x.shape and out.transpose(1, 2).is_contiguous()  # computed in memory order
    torch.testing.assert_close(out, torch.einsum("bhtd,de->bhte", x, m), rtol=1e-12, atol=1e-12)
    c = x.contiguous()
    assert torch.equal(runtime.head_rows_matmul(c, m), c @ m)  # other layouts: plain matmul


@torch.no_grad()
def test_cache_storage_is_never_read_before_it_is_written(packed, monkeypatch):
    """The INT4 cache allocates its storage uninitialised; filled with garbage (0xFF codes, NaN / inf scales and
    zero points) it must give the same prefill, regrowth, crop and decode logits as zeroed storage."""
    import flatquant.kvcache as kvc

    def garbage(shape, dtype, device):
        t = torch.empty(shape, dtype=dtype, device=device)
        return t.fill_(255) if dtype == torch.uint8 else t.fill_(float("nan"))

    _, real, _ = packed["llama"]

    def run(alloc):
        monkeypatch.setattr(kvc, "_new_storage", alloc)
        cache, out = Int4KVCache(real, min_capacity=8), []  # 8: regrown (copied) during the prompt's steps
        out.append(real(_TOKENS[:2, :6], **cache_kwargs(real, cache)).logits)
        for i in range(6, 12):  # one token at a time through the doubling
            out.append(real(_TOKENS[:2, i : i + 1], **cache_kwargs(real, cache)).logits)
        cache.crop(-3)  # stale positions past the new length must stay unread
        out.append(real(_TOKENS[:2, 20:22], **cache_kwargs(real, cache)).logits)
        cache.make_static(24)
        out.append(real(_TOKENS[:2, 22:23], **cache_kwargs(real, cache)).logits)
        return out

    zeroed, poisoned = run(torch.zeros), run(garbage)
    for a, b in zip(zeroed, poisoned, strict=True):
        assert torch.isfinite(b).all()
        assert torch.equal(a, b)


@pytest.mark.parametrize("arch", sorted(ARCHS))
@torch.no_grad()
def test_graphed_prefill_pads_to_a_bucket_and_equals_the_eager_prefill(packed, arch):
    """The padded static prefill (what a CUDA graph replays; eager here) gives the last prompt token's logits
    of a plain prefill, leaves the cache holding exactly the prompt, and decoding on from it (static decoder)
    gives what decoding from a regular cache gives. The padding must not leak: a different pad id changes
    nothing, and a second prompt of another length reuses the buffers."""
    from flatquant.kvcache import GraphedDecoder, GraphedPrefill

    _, real, _ = packed[arch]
    for b, length in ((1, 13), (3, 20)):
        prompt = _TOKENS[:b, :length]
        ref_cache = Int4KVCache(real)
        ref = real(prompt, **cache_kwargs(real, ref_cache)).logits[:, -1]
        outs = []
        for pad in (0, 77):
            cache = Int4KVCache(real)
            pre = GraphedPrefill(real, cache, capacity=40, buckets=(16, 32), use_graph=False, pad_token_id=pad)
            assert pre.bucket(length) == (16 if length <= 16 else 32)
            outs.append(pre(prompt).clone())
            assert cache.get_seq_length() == length and (cache.layers[-1].lens == length).all()
            torch.testing.assert_close(outs[-1], ref, rtol=1e-5, atol=1e-5)
        assert torch.equal(outs[0], outs[1])  # the pad tokens are invisible
        dec, nxt = GraphedDecoder(real, cache, use_graph=False), ref.argmax(-1, keepdim=True)
        for _ in range(3):
            ref = real(nxt, **cache_kwargs(real, ref_cache)).logits[:, -1]
            torch.testing.assert_close(dec.step(nxt), ref, rtol=1e-5, atol=1e-5)
            nxt = ref.argmax(-1, keepdim=True)
    short = _TOKENS[:3, :5]  # the same prefill object, another length: the 16-token bucket, the cache reset
    torch.testing.assert_close(pre(short), real(short).logits[:, -1], rtol=1e-5, atol=1e-5)
    assert cache.get_seq_length() == 5
    with pytest.raises(ValueError, match="exceeds the largest bucket"):
        pre(torch.zeros((1, 33), dtype=torch.long))
    with pytest.raises(ValueError, match="buckets"):
        GraphedPrefill(real, Int4KVCache(real), capacity=8, buckets=(16,))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (graph capture)")
@torch.no_grad()
def test_graphed_prefill_replays_equal_the_eager_padded_prefill(packed):
    """On a GPU: the second call of a bucket is captured, later calls replay; replays of prompts of different
    lengths in one bucket give the eager padded prefill's logits and caches exactly."""
    from flatquant.kvcache import GraphedPrefill

    _, _, path = packed["llama"]
    real = load_packed(path, device="cuda", dtype=torch.bfloat16)
    prompts = [_TOKENS[:2, :n].cuda() for n in (20, 17, 24, 20)]
    results = []
    for use_graph in (False, True):
        cache = Int4KVCache(real)
        pre = GraphedPrefill(real, cache, capacity=40, buckets=(32,), use_graph=use_graph)
        seen = []
        for p in prompts:
            logits = pre(p).clone()
            k, v = cache.layers[0].dequantized(torch.float32)
            seen.append((logits, k, v))
        results.append(seen)
    assert pre._static[(2, 32)]["graph"] is not None
    for (a, ka, va), (b, kb, vb) in zip(results[0], results[1], strict=True):
        assert torch.equal(a, b) and torch.equal(ka, kb) and torch.equal(va, vb)


@pytest.mark.parametrize("arch", sorted(ARCHS))
@torch.no_grad()
def test_graphed_prefill_attends_with_sdpa_causal_masking_even_when_a_mask_is_built(packed, arch, monkeypatch):
    """While a CUDA graph is captured transformers builds the causal mask instead of skipping it (on CUDA a slower
    masked SDPA kernel, K/V repeated per query head). GraphedPrefill's prompts start at position 0 with no padding
    mask, so its attention drops that mask: same logits; a plain forward keeps a mask it is given."""
    import transformers.masking_utils as masking

    from flatquant.kvcache import GraphedPrefill

    _, real, _ = packed[arch]
    prompt = _TOKENS[:2, :13]

    def prefill():
        pre = GraphedPrefill(real, Int4KVCache(real), capacity=24, buckets=(16,), use_graph=False)
        return pre(prompt).clone()

    expected = prefill()
    masks = []
    sdpa = runtime.sdpa_attention_forward

    def spy(module, query, key, value, attention_mask, **kwargs):
        masks.append(attention_mask)
        return sdpa(module, query, key, value, attention_mask, **kwargs)

    monkeypatch.setattr(runtime, "sdpa_attention_forward", spy)
    monkeypatch.setattr(masking, "_ignore_causal_mask_sdpa", lambda *a, **k: False)  # as under graph capture
    got = prefill()
    assert len(masks) == real.config.num_hidden_layers and all(m is None for m in masks)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    masks.clear()
    real(prompt, **cache_kwargs(real, Int4KVCache(real)))
    assert masks and all(m is not None for m in masks)
    if arch == "llama":  # a model type not known to be causal (e.g. a registered architecture) keeps its mask
        import flatquant.kvcache as kvcache

        monkeypatch.setattr(kvcache, "CAUSAL_MODEL_TYPES", ())
        masks.clear()
        torch.testing.assert_close(prefill(), expected, rtol=1e-5, atol=1e-5)
        assert len(masks) == real.config.num_hidden_layers and all(m is not None for m in masks)
    if arch == "mistral":  # a sliding window shorter than the prompt: the mask is not purely causal, kept
        monkeypatch.undo()
        monkeypatch.setattr(real.config, "sliding_window", 4)
        with pytest.raises(ValueError, match="sliding window"):  # static caches stop at the window
            prefill()

        def causal_prompt_forward():  # the flag GraphedPrefill sets, on a dynamic cache
            cache = Int4KVCache(real)
            real(prompt[:, :1], **cache_kwargs(real, cache))  # initialise the layers
            for layer in cache.layers:
                layer.length, layer.causal_prompt = 0, True
            return real(prompt, **cache_kwargs(real, cache)).logits

        windowed = causal_prompt_forward()
        assert not torch.allclose(windowed[:, -1], expected, atol=1e-3)  # the window changes the result
        monkeypatch.setattr(runtime, "sdpa_attention_forward", spy)
        monkeypatch.setattr(masking, "_ignore_causal_mask_sdpa", lambda *a, **k: False)
        masks.clear()
        torch.testing.assert_close(causal_prompt_forward(), windowed, rtol=1e-5, atol=1e-5)
        n = real.config.num_hidden_layers
        assert len(masks) == 2 * n and all(m is not None for m in masks[n:])  # after the 1-token initialisation


@torch.no_grad()
def test_static_caches_past_a_sliding_window_are_refused(packed, monkeypatch):
    """Static decoding attends over the whole cache, so a capacity past the model's sliding window would attend
    beyond it: refused with the reason, while a window at least as long as the capacity (or none) is fine."""
    _, real, _ = packed["mistral"]
    monkeypatch.setattr(real.config, "sliding_window", 4)
    cache = Int4KVCache(real)
    assert cache.windows == [4] * real.config.num_hidden_layers
    real(_TOKENS[:1, :3], **cache_kwargs(real, cache))
    with pytest.raises(ValueError, match="sliding window"):
        cache.make_static(16)
    cache.make_static(4)
    with pytest.raises(ValueError, match="sliding window"):
        fq.GenerationSession(real, max_length=16, use_graph=False).generate(_TOKENS[:1, :3], max_new_tokens=2)
    monkeypatch.setattr(real.config, "sliding_window", 16)
    out = fq.GenerationSession(real, max_length=16, use_graph=False).generate(_TOKENS[:1, :3], max_new_tokens=2)
    assert out.shape == (1, 5)
    monkeypatch.setattr(real.config, "sliding_window", 4)  # 3 + 2 tokens need 4 cache positions: fits
    assert torch.equal(fq.generate(real, _TOKENS[:1, :3], 2, use_graph=False), out)
    with pytest.raises(ValueError, match="min_capacity=0"):
        Int4KVCache(real, min_capacity=0)


def test_sliding_windows_per_layer_follow_the_config():
    from transformers import MistralConfig, Qwen2Config

    from flatquant.kvcache import _sliding_windows

    qwen = Qwen2Config(num_hidden_layers=4, use_sliding_window=True, max_window_layers=2, sliding_window=16)
    assert _sliding_windows(qwen, 4) == [None, None, 16, 16]
    assert _sliding_windows(Qwen2Config(num_hidden_layers=2), 2) == [None, None]
    assert _sliding_windows(MistralConfig(num_hidden_layers=2, sliding_window=64), 2) == [64, 64]
    assert _sliding_windows(MistralConfig(num_hidden_layers=2, sliding_window=None), 2) == [None, None]
    mistral = MistralConfig(num_hidden_layers=2, sliding_window=64, layer_types=["full_attention"] * 2)
    assert _sliding_windows(mistral, 2) == [64, 64]  # Mistral applies its window to every layer


@torch.no_grad()
def test_one_token_prompt_after_a_longer_one_starts_from_position_zero(packed):
    """A one-token bucket goes through the cache's static decode path, which writes at the device-side lengths:
    those of the previous prompt unless reset. Its logits must equal a fresh forward's."""
    from flatquant.kvcache import GraphedPrefill

    _, real, _ = packed["llama"]
    pre = GraphedPrefill(real, Int4KVCache(real), capacity=24, buckets=(1, 16), use_graph=False)
    pre(_TOKENS[:1, :5])
    one = _TOKENS[:1, 7:8]
    got = pre(one).clone()
    expected = real(one, **cache_kwargs(real, Int4KVCache(real))).logits[:, -1]
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert pre.cache.layers[0].length == 1 and int(pre.cache.layers[0].lens[0]) == 1


@torch.no_grad()
def test_generation_session_reuses_its_cache_and_decoder_across_requests(packed):
    """One session serves requests of several prompt lengths and batch sizes: each gives fq.generate's tokens
    (prompts padded to buckets here), the decoder of a batch size is made once and kept (on CUDA its graph is
    captured once), and a request longer than the session's cache is refused."""
    _, real, _ = packed["mistral"]
    session = fq.GenerationSession(real, max_length=40, buckets=(16, 32), use_graph=False)
    decoders = {}
    for b, t, new in ((2, 9, 6), (2, 14, 5), (3, 20, 4), (2, 11, 7)):
        ids = _TOKENS[:b, :t]
        got = session.generate(ids, new)
        assert torch.equal(got, fq.generate(real, ids, new, use_graph=False))
        decoder = session._decoders[b]
        assert decoders.setdefault(b, decoder) is decoder  # reused, not rebuilt
    sampled = session.generate(_TOKENS[:2, :9], 5, do_sample=True, top_k=5, generator=torch.Generator().manual_seed(4))
    want = fq.generate(real, _TOKENS[:2, :9], 5, do_sample=True, top_k=5, generator=torch.Generator().manual_seed(4))
    assert torch.equal(sampled, want)
    with pytest.raises(ValueError, match="max_length=40"):
        session.generate(_TOKENS[:1, :30], 12)


@pytest.mark.parametrize("arch", sorted(ARCHS))
@torch.no_grad()
def test_layer_norms_run_inside_the_quantizer_of_the_input_they_feed(packed, arch):
    """load_packed folds each layer's input and post-attention RMSNorm into the q/k/v and gate/up transform +
    quantize (one launch fewer each on CUDA); the model computes exactly what it computes with the norms as
    separate modules (bf16: the fused path; its reference on the CPU), and the state dict keeps its keys."""
    _, _, path = packed[arch]
    fused = load_packed(path, device="cpu", dtype=torch.bfloat16)
    plain = load_packed(path, device="cpu", dtype=torch.bfloat16, fuse=False)
    for layer in fused.model.layers:
        assert isinstance(layer.input_layernorm, runtime.DeferredRMSNorm)
        assert isinstance(layer.post_attention_layernorm, runtime.DeferredRMSNorm)
        assert layer.self_attn.qkv_quant.norm[0] is layer.input_layernorm
        assert layer.mlp.gate_proj._source[0].norm[0] is layer.post_attention_layernorm
    assert not any(isinstance(m, runtime.DeferredRMSNorm) for m in plain.modules())
    assert fused.state_dict().keys() == plain.state_dict().keys()
    torch.testing.assert_close(fused(_TOKENS).logits, plain(_TOKENS).logits, rtol=0, atol=0)
    assert fq.packed.defer_norms(fused) == 0  # already folded: nothing left to fold
    from flatquant.kernels.rmsnorm import fuse_rms_norms

    assert fuse_rms_norms(fused) == 0  # a folded norm is not swapped back into a norm that runs again
    torch.testing.assert_close(fused(_TOKENS).logits, plain(_TOKENS).logits, rtol=0, atol=0)


def test_norm_folding_can_be_switched_off_for_comparisons(packed, monkeypatch):
    _, _, path = packed["llama"]
    monkeypatch.setenv("FLATQUANT_FUSE_NORMS", "0")
    model = load_packed(path, device="cpu")
    assert not any(isinstance(m, runtime.DeferredRMSNorm) for m in model.modules())
    assert model.model.layers[0].self_attn.qkv_quant.w_packed is not None  # the GEMMs are still fused


def _dequantized(mod) -> torch.Tensor:
    """codes * scale of an int8 head module in float64, per row or per group of columns (another way than the
    modules' view arithmetic: repeat_interleave of the scales)."""
    n, k = mod.weight_q.shape
    s = mod.weight_scale.double().reshape(n, -1)
    return mod.weight_q.double() * s.repeat_interleave(k // s.shape[1], dim=1)


@pytest.mark.parametrize("tied,group", [(False, None), (True, None), (False, 16), (True, 128)])
def test_int8_head_halves_the_embedding_bytes_and_keeps_the_logits(tmp_path, tied, group):
    """pack(head_bits=8): the input embedding and lm_head (one matrix when tied) become int8 codes and fp32
    scales per row or per group of columns (the default 128 falls back to 64 for the tiny model's 64 columns);
    the loaded model's embedding rows are codes * scale exactly, its logits stay within the int8 rounding of the
    16-bit head's, and the checkpoint is smaller by about half the head's bytes."""
    model = tiny_model("llama", tie_word_embeddings=tied)
    cfg = fq.FlatQuantConfig(nsamples=4, seqlen=32, epochs=1, autocast_dtype="float32")
    fq.quantize(model, cfg, _TOKENS, device="cpu", progress=False)
    p16 = pack(model, str(tmp_path / "h16"))
    p8 = pack(model, str(tmp_path / "h8"), head_bits=8, head_group=group)
    a, b = load_packed(p16, device="cpu"), load_packed(p8, device="cpu")
    emb = b.get_input_embeddings()
    assert isinstance(emb, runtime.Int8Embedding) and isinstance(b.get_output_embeddings(), runtime.Int8Linear)
    assert emb.weight_q.dtype == torch.int8 and emb.weight_q.abs().max() == 127
    groups = {None: 1, 16: 4, 128: 1}[group]  # 64 columns: 128 falls back to 64, one group
    assert emb.weight_scale.shape == ((128,) if group is None else (128, groups))
    assert (b.get_output_embeddings().weight_q is emb.weight_q) == tied
    w = a.get_input_embeddings().weight
    deq = _dequantized(emb)
    assert ((deq - w.double()).abs() <= 0.5 * emb.weight_scale.max().item() + 1e-7).all()
    torch.testing.assert_close(emb(_TOKENS), deq[_TOKENS].float(), rtol=0, atol=0)
    with torch.no_grad():
        h = torch.randn(2, 5, w.shape[1])
        head_a, head_b = a.get_output_embeddings()(h), b.get_output_embeddings()(h)
        w_a = a.get_output_embeddings().weight
        lin = b.get_output_embeddings()
        deq = _dequantized(lin)
        torch.testing.assert_close(head_b.double(), h.double() @ deq.T, rtol=1e-5, atol=1e-5)  # codes * scale
        half = 0.5 * lin.weight_scale.double().reshape(len(deq), -1).repeat_interleave(64 // groups, dim=1)
        bound = h.double().abs() @ half.T  # rounding
        assert ((head_b.double() - head_a.double()).abs() <= bound + 1e-5).all() and not torch.equal(head_a, head_b)
        assert torch.equal(w_a, a.get_input_embeddings().weight) == tied
        assert torch.isfinite(b(_TOKENS).logits).all()
    head = w.numel() * w.element_size() * (1 if tied else 2)
    size = lambda p: os.path.getsize(os.path.join(p, TENSORS_FILE))  # noqa: E731
    assert size(p16) - size(p8) > 0.5 * head
    meta = json.load(open(os.path.join(p8, CONFIG_FILE)))
    assert meta["head_bits"] == 8 and meta["head_group"] == {None: None, 16: 16, 128: 64}[group]
    with pytest.raises(ValueError, match="head_bits=4 is not one of"):
        pack(model, str(tmp_path / "h4"), head_bits=4)
    with pytest.raises(ValueError, match="head_group=24 must be a multiple of 16 that divides the hidden size 64"):
        pack(model, str(tmp_path / "h4"), head_bits=8, head_group=24)
    assert not os.path.exists(tmp_path / "h4")


def test_grouped_int8_rows_against_float64():
    """quantize_rows_int8 per group: codes within [-127, 127], each group's absmax at +-127, rows rebuilt within
    half a step; Int8Linear (reference on the CPU) equals x @ (codes * scale)^T in float64."""
    w = torch.randn(40, 96) * torch.logspace(-2, 1, 96)  # columns of very different size: groups matter
    codes, scale = runtime.quantize_rows_int8(w, 32)
    assert codes.dtype == torch.int8 and scale.shape == (40, 3) and scale.dtype == torch.float32
    assert torch.equal(codes.view(40, 3, 32).abs().amax(-1), torch.full((40, 3), 127, dtype=torch.int8))
    lin = runtime.Int8Linear(96, 40, group=32)
    lin.weight_q.copy_(codes), lin.weight_scale.copy_(scale)
    deq = _dequantized(lin)
    assert ((deq - w.double()).abs() <= 0.5 * scale.double().repeat_interleave(32, dim=1) + 1e-9).all()
    per_row = runtime.quantize_rows_int8(w)
    row_err = (per_row[0].double() * per_row[1].double()[:, None] - w.double())[:, :64].norm()
    assert (deq - w.double())[:, :64].norm() < 0.2 * row_err  # the small columns: far closer than per row
    x = torch.randn(3, 96)
    torch.testing.assert_close(lin(x).double(), x.double() @ deq.T, rtol=1e-5, atol=1e-5)
    emb = runtime.Int8Embedding(40, 96, torch.float32, group=32)
    emb.weight_q.copy_(codes), emb.weight_scale.copy_(scale)
    ids = torch.tensor([[3, 0, 39], [7, 7, 1]])
    torch.testing.assert_close(emb(ids), deq[ids].float(), rtol=0, atol=0)
    assert emb(torch.zeros(2, 0, dtype=torch.long)).shape == (2, 0, 96)  # no ids: an empty batch of rows
    with pytest.raises(ValueError, match="group=20 must be a positive divisor of the 96 columns"):
        runtime.quantize_rows_int8(w, 20)
    with pytest.raises(ValueError, match="group=20 must be a positive divisor of the 96 columns"):
        runtime.Int8Linear(96, 40, group=20)


@pytest.mark.parametrize("arch", sorted(ARCHS))
@torch.no_grad()
def test_residual_additions_run_in_the_o_and_down_gemms(packed, arch, monkeypatch):
    """load_packed lets each decoder layer add its two residuals in the o_proj and down_proj GEMMs' epilogues;
    the logits are bit for bit those of the layers' own additions (bf16, and fp32), the state dict is unchanged,
    and o_proj holds no residual once the layer has run."""
    _, _, path = packed[arch]
    for dtype in (torch.bfloat16, torch.float32):
        fused = load_packed(path, device="cpu", dtype=dtype)
        monkeypatch.setenv("FLATQUANT_FUSE_RESIDUAL", "0")
        plain = load_packed(path, device="cpu", dtype=dtype)
        monkeypatch.delenv("FLATQUANT_FUSE_RESIDUAL")
        assert all(isinstance(layer, runtime.ResidualFusedLayer) for layer in fused.model.layers)
        assert not any(isinstance(layer, runtime.ResidualFusedLayer) for layer in plain.model.layers)
        assert fused.state_dict().keys() == plain.state_dict().keys()
        calls = []

        def pending(mod, args, kwargs, calls=calls):  # at call time: a residual passed or handed over
            calls.append(kwargs.get("residual") is not None or mod.next_residual is not None)

        for layer in fused.model.layers:  # the residual really reaches both GEMMs
            for lin in (layer.self_attn.o_proj, layer.mlp.down_proj):
                lin.register_forward_pre_hook(pending, with_kwargs=True)
        want = plain(_TOKENS).logits
        torch.testing.assert_close(fused(_TOKENS).logits, want, rtol=0, atol=0)
        assert len(calls) == 2 * len(fused.model.layers) and all(calls)
        assert all(layer.self_attn.o_proj.next_residual is None for layer in fused.model.layers)
        assert fq.packed.fuse_residuals(fused) == 0  # already fused
        # positional arguments after hidden_states are named as the layer's own forward names them
        layer, h = fused.model.layers[0], torch.randn(1, 4, fused.config.hidden_size, dtype=dtype)
        emb = fused.model.rotary_emb(h, torch.arange(4)[None])
        ref = plain.model.layers[0](h, None, position_embeddings=emb)
        torch.testing.assert_close(layer(h, None, position_embeddings=emb), ref, rtol=0, atol=0)


@torch.no_grad()
def test_residual_fused_models_pickle_and_registered_architectures_keep_their_layers(packed, tmp_path):
    """A packed model with residual-fused layers survives torch.save / torch.load and deepcopy (its layer class
    is made at run time) with the same logits; a model type outside the built-in four keeps its layers' own
    forward (it may do more than add, e.g. scale the branch); a residual of another layout is still added."""
    import copy

    _, _, path = packed["qwen2"]
    model = load_packed(path, device="cpu")
    torch.save(model, tmp_path / "m.pt")  # before a forward (a run leaves weak references in caches)
    duplicate = copy.deepcopy(model)
    want = model(_TOKENS).logits
    again = torch.load(tmp_path / "m.pt", weights_only=False)
    assert isinstance(again.model.layers[0], runtime.ResidualFusedLayer)
    torch.testing.assert_close(again(_TOKENS).logits, want, rtol=0, atol=0)
    torch.testing.assert_close(duplicate(_TOKENS).logits, want, rtol=0, atol=0)
    other = load_packed(path, device="cpu", fuse=False)
    other.config.model_type = "granite"  # as a registered architecture would be
    assert fq.packed.fuse_residuals(other) == 0
    lin = model.model.layers[0].mlp.down_proj
    x = torch.randn(3, lin.in_features)
    strided = torch.randn(lin.out_features, 3).t()  # unit stride over tokens, not over N
    torch.testing.assert_close(lin(x, residual=strided), strided + lin(x), rtol=0, atol=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (kernels, graph capture)")
@pytest.mark.parametrize("arch", sorted(ARCHS))
@torch.no_grad()
def test_residual_fusion_on_cuda_gives_the_same_bits(packed, arch, monkeypatch):
    """On CUDA (Triton GEMMs with the residual epilogue, autotuned; CUDA graphs) the fused model's logits and
    greedy generations equal those of the separate additions exactly."""
    _, _, path = packed[arch]
    got = {}
    for env in ("1", "0"):
        monkeypatch.setenv("FLATQUANT_FUSE_RESIDUAL", env)
        model = load_packed(path, device="cuda", dtype=torch.bfloat16)
        assert isinstance(model.model.layers[0], runtime.ResidualFusedLayer) == (env == "1")
        tokens = _TOKENS.cuda()
        got[env] = (model(tokens).logits, model(tokens[:1, :1]).logits, fq.generate(model, tokens[:, :20], 6))
    for fused, plain in zip(got["1"], got["0"], strict=True):
        assert torch.equal(fused, plain)


@pytest.mark.skipif(torch.cuda.is_available(), reason="forces the path on the CPU; on a GPU: test_gemm_dense.py")
@pytest.mark.parametrize(
    "dtype,act_symmetric", [(torch.float32, True), (torch.bfloat16, True), (torch.bfloat16, False)]
)
@torch.no_grad()
def test_prefill_on_the_dense_fp8_gemm_path(packed, asym_packed, dtype, act_symmetric, monkeypatch):
    """The runtime on the dense FP8 GEMM path (forced here on the CPU: Triton's interpreter unpacks, PyTorch's CPU
    _scaled_mm multiplies): every W4A4 GEMM of the prefill takes it, a bf16 model's transform hands it e4m3 codes
    (centred, code - zero, for asymmetric activations), and the logits equal those of the reference GEMM (int8
    codes and zero points) up to the epilogue's rounding."""
    from flatquant.kernels import gemm_dense as gd
    from flatquant.kernels import gemm_w4a4 as gw

    path = packed["llama"][2] if act_symmetric else asym_packed[1]
    real = load_packed(path, device="cpu", dtype=dtype)
    reference_calls = []
    reference = gw.w4a4_gemm_reference
    monkeypatch.setattr(gw, "w4a4_gemm_reference", lambda *a, **k: reference_calls.append(1) or reference(*a, **k))
    base = real(_TOKENS).logits.float()
    monkeypatch.setattr(gd, "_auto_device", lambda device: True)  # as on a GPU with FP8 tensor cores
    monkeypatch.setattr(gd, "DENSE_M", 8)
    for module in real.modules():
        if hasattr(module, "gemm_impl"):
            module.gemm_impl = "triton"
    dense_codes = []
    dense_gemm = gd.dense_gemm
    monkeypatch.setattr(gd, "dense_gemm", lambda x, *a: dense_codes.append(x.dtype) or dense_gemm(x, *a))
    out = real(_TOKENS).logits.float()
    assert reference_calls and len(dense_codes) == len(reference_calls)  # every GEMM, none left on the reference
    assert set(dense_codes) == {torch.int8 if dtype == torch.float32 else torch.float8_e4m3fn}
    rel = ((out - base).norm() / base.norm()).item()
    assert rel < (1e-5 if dtype == torch.float32 else 1e-2), rel  # fp32: ~2e-7; bf16: a few output roundings
