"""Zero-shot accuracy through lm-evaluation-harness (the ``lm-eval`` package), on the in-memory model.

The model is evaluated as it is in memory (original, fake-quantized or merged), wrapped in lm-eval's
``HFLM``; nothing is saved or reloaded. Tasks come from lm-eval's registry (datasets from the hub) or from
an ``include_path`` folder of task YAMLs, e.g. one pointing at local JSON files so that it runs offline::

    task: my_piqa
    dataset_path: json
    dataset_kwargs: {data_files: {validation: /abs/path/piqa.jsonl}}
    validation_split: validation
    output_type: multiple_choice
    doc_to_text: "Question: {{goal}}\\nAnswer:"
    doc_to_choice: "{{[sol1, sol2]}}"
    doc_to_target: label
    metric_list: [{metric: acc}, {metric: acc_norm}]
"""

from __future__ import annotations

import functools
import os

import torch

# The six zero-shot tasks of the FlatQuant paper (and most W4A4 papers); their unweighted mean is reported.
PAPER_TASKS = ("arc_challenge", "arc_easy", "hellaswag", "lambada_openai", "piqa", "winogrande")
PAPER_MEAN = "paper_mean"
_INSTALL = "zero-shot evaluation needs lm-evaluation-harness: pip install 'lm-eval>=0.4' (or flatquant[eval])"


def _lm_eval():
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError as e:
        raise ImportError(_INSTALL) from e
    return lm_eval, HFLM, TaskManager


def task_manager(tasks: list[str], include_path: str | os.PathLike | None = None):
    """lm-eval's ``TaskManager`` that knows every name in ``tasks``; ``ValueError`` naming the unknown ones.

    Indexing lm-eval's own thousands of task configs takes seconds, so when ``include_path`` alone has
    every task, the built-in ones are not indexed.
    """
    _lm_eval()
    if include_path is not None and not os.path.isdir(include_path):
        raise FileNotFoundError(f"task folder {include_path=} does not exist")
    include_path = None if include_path is None else os.path.abspath(include_path)
    manager = None
    if include_path is not None:
        manager = _indexed(include_path, include_defaults=False)
        if any(t not in manager.all_tasks for t in tasks):
            manager = None
    if manager is None:
        manager = _indexed(include_path, include_defaults=True)
    missing = [t for t in tasks if t not in manager.all_tasks]
    if missing:
        where = "lm-eval's tasks" + ("" if include_path is None else f" or {include_path}")
        raise ValueError(f"unknown zero-shot task(s) {missing}: not in {where} (see `lm-eval ls tasks`)")
    return manager


@functools.lru_cache(maxsize=4)
def _indexed(include_path: str | None, include_defaults: bool):
    """A ``TaskManager`` per folder, so that checking the tasks and running them index them once."""
    _, _, TaskManager = _lm_eval()
    return TaskManager(include_path=include_path, include_defaults=include_defaults)


def task_scores(results: dict) -> dict[str, dict]:
    """Per task of an lm-eval results dict: ``{"metric": "acc_norm"|"acc", "value": float, "stderr": float}``.

    acc_norm (length-normalised log-likelihood) where the task reports it, else acc, as in the papers.
    """
    scores = {}
    for task, metrics in results["results"].items():
        for metric in ("acc_norm", "acc"):
            key = f"{metric},none"
            if key in metrics:
                stderr = metrics.get(f"{metric}_stderr,none")
                stderr = float(stderr) if isinstance(stderr, (int, float)) else None  # "N/A" when not computed
                scores[task] = {"metric": metric, "value": float(metrics[key]), "stderr": stderr}
                break
    return scores


def paper_mean(scores: dict[str, dict]) -> float | None:
    """Unweighted mean of the paper's six tasks that were run; ``None`` when none of them was."""
    values = [scores[t]["value"] for t in PAPER_TASKS if t in scores]
    return sum(values) / len(values) if values else None


def run_tasks(
    model: torch.nn.Module,
    tokenizer,
    tasks: list[str],
    *,
    include_path: str | os.PathLike | None = None,
    limit: int | float | None = None,
    batch_size: int = 1,
    device: str | torch.device | None = None,
    seed: int = 1234,
) -> dict:
    """Evaluate ``model`` zero-shot on lm-eval ``tasks``; returns the scores, the settings and lm-eval's output.

    Returns ``{"scores": task_scores(...), "paper_mean": float | None, "settings": {...}, "lm_eval": results}``
    where ``results`` is what ``lm_eval.simple_evaluate`` returned, without the per-sample logs.
    ``limit`` evaluates the first ``limit`` documents of each task (a fraction when < 1), for quick checks.
    """
    if not tasks:
        raise ValueError(f"{tasks=}: name at least one zero-shot task")
    lm_eval, HFLM, _ = _lm_eval()
    manager = task_manager(list(tasks), include_path)
    if device is not None:
        model.to(device)
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=str(model.device))
    results = lm_eval.simple_evaluate(
        model=lm,
        tasks=list(tasks),
        num_fewshot=0,
        limit=limit,
        task_manager=manager,
        log_samples=False,
        random_seed=seed,
        numpy_random_seed=seed,
        torch_random_seed=seed,
        fewshot_random_seed=seed,
    )
    scores = task_scores(results)
    settings = {
        "tasks": list(tasks),
        "include_path": None if include_path is None else os.path.abspath(include_path),
        "limit": limit,
        "num_fewshot": 0,
        "batch_size": batch_size,
        "seed": seed,
        "lm_eval_version": lm_eval.__version__ if hasattr(lm_eval, "__version__") else _version("lm-eval"),
    }
    lm_results = {k: results[k] for k in ("results", "versions", "n-shot", "higher_is_better") if k in results}
    return {"scores": scores, "paper_mean": paper_mean(scores), "settings": settings, "lm_eval": lm_results}


def _version(dist: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return None
