"""The model card of a release: ``README.md`` in its folder and its registered version's description.

One pure function, :func:`model_card`, from the release metadata (what ``tasks/release.py`` writes to
``metadata.json``, plus how the model was chosen and promoted) to markdown. Everything in it is read
off that metadata, so the card says exactly what was measured, never a rounded memory of it.
"""
from __future__ import annotations

import json
import math
from typing import Any, Mapping

MAX_CARD_CHARS = 5000  # MLflow keeps a version's description in a 5,000-character column
MAX_LISTED_CLASSES = 20


def model_card(metadata: Mapping[str, Any]) -> str:
    """Markdown for a release: what it is, how fast and accurate it is where, how to feed it, where it
    came from, why it was chosen and promoted, and what it is not for."""
    meta = dict(metadata)
    metrics, latency = meta.get("metrics") or {}, meta.get("latency") or {}
    device, artifact = meta.get("device_profile") or {}, meta.get("artifact") or {}
    spec, lineage = meta.get("input_spec") or {}, meta.get("lineage") or {}
    evaluation, promotion = meta.get("evaluation") or {}, meta.get("promotion") or {}
    sections = [
        f"# {meta.get('model', '?')} for {meta.get('device', '?')}",
        (f"Candidate `{meta.get('candidate', '?')}` (method `{meta.get('method', '?')}`), run as "
         f"`{artifact.get('main', 'model.onnx')}` with {artifact.get('runtime', '?')} in "
         f"{artifact.get('precision', 'fp32')}."),
        _table([
            ("Method", f"{meta.get('method', '?')}: {_config_text(meta.get('config'))}"),
            ("Device", _device_text(meta.get("device", "?"), device)),
            ("Runtime", (f"{artifact.get('runtime', '?')}, {artifact.get('precision', 'fp32')}, files: "
                         f"{', '.join(artifact.get('files') or ['model.onnx'])}")),
            ("Accuracy", _accuracy_text(metrics, evaluation)),
            ("Latency", _latency_text(latency, metrics)),
            ("Peak memory", _mb(metrics.get("peak_mem_mb", latency.get("peak_mem_mb")))),
            ("Cost", f"{_count(metrics.get('flops'), 'FLOPs')}, {_count(metrics.get('params'), 'params')}"),
        ]),
        "## Input and preprocessing",
        _preprocessing_text(meta.get("preprocessing") or {}, spec, meta.get("interface") or {}),
        "## How it was chosen",
        (f"- On {meta.get('device', 'this device')}: {meta.get('chosen') or 'the only candidate'}.\n"
         f"- Against the champion: {promotion.get('reason') or 'no comparison recorded'}; decision: "
         f"{'promote it to champion' if promotion.get('promote') else 'keep the champion'}."),
        "## Lineage",
        _table([
            ("Data (DVC md5)", f"`{lineage.get('data_hash', '?')}`"),
            ("Git commit", f"`{lineage.get('git_sha', '?')}`"),
            ("MLflow run", f"`{lineage.get('run_id', '?')}`"),
            ("Model digest", f"`{lineage.get('digest', '?')}`"),
        ]),
        "## Intended use and limits",
        _limits_text(meta, spec, device, artifact, evaluation),
    ]
    card = "\n\n".join(sections) + "\n"
    if len(card) > MAX_CARD_CHARS:  # a huge config or class list: cut, and say where the rest is
        card = card[:MAX_CARD_CHARS - 80].rstrip() + "\n\n(cut here: metadata.json in the release has every field)\n"
    return card


def _table(rows: list[tuple[str, str]]) -> str:
    return "\n".join(["| | |", "|---|---|", *(f"| {key} | {_cell(value)} |" for key, value in rows)])


def _cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _config_text(config: Any) -> str:
    if not isinstance(config, Mapping) or not config:
        return "as trained"
    text = ", ".join(f"{k}={v if isinstance(v, str) else json.dumps(v, sort_keys=True, default=str)}"
                     for k, v in sorted(config.items()))
    return text if len(text) <= 300 else text[:297] + "..."


def _device_text(name: str, device: Mapping[str, Any]) -> str:
    if not device:
        return name
    return (f"{name}: {device.get('threads', '?')} thread(s), batch {device.get('batch_size', '?')}, budget "
            f"{_num(device.get('latency_budget_ms'))} ms and {_num(device.get('memory_budget_mb'))} MB")


def _accuracy_text(metrics: Mapping[str, Any], evaluation: Mapping[str, Any]) -> str:
    acc = metrics.get("val_acc")
    if acc is None:
        return "not measured"
    images = evaluation.get("images")
    where = f" on {images} {evaluation.get('split', 'validation')} images" if images else " on the validation split"
    return f"{100 * float(acc):.2f} % top-1{where}, measured in the device's runtime and precision"


def _latency_text(latency: Mapping[str, Any], metrics: Mapping[str, Any]) -> str:
    p50, p90 = latency.get("p50_ms", metrics.get("p50_ms")), latency.get("p90_ms", metrics.get("p90_ms"))
    if not _finite(p50):
        return "not measured"
    low, high = latency.get("p50_low_ms"), latency.get("p50_high_ms")
    interval = (f" (95 % interval of the median {_num(low)}-{_num(high)} ms)"
                if _finite(low) and _finite(high) else "")
    rounds = f", {latency['rounds']} rounds" if latency.get("rounds") else ""
    noisy = "; noisy: interference was seen and more rounds did not get past it" if latency.get("noisy") else ""
    return f"p50 {_num(p50)} ms{interval}, p90 {_num(p90)} ms per batch{rounds}{noisy}"


def _preprocessing_text(pre: Mapping[str, Any], spec: Mapping[str, Any], interface: Mapping[str, Any]) -> str:
    resize = pre.get("resize") or {}
    if resize.get("shorter_side"):
        resize_text = (f"resize the shorter side to {resize.get('size')} (longer side "
                       f"{resize.get('longer_side')})")
    else:
        resize_text = f"resize to exactly {resize.get('size')} (height, width)"
    inp, out = interface.get("input") or {}, interface.get("output") or {}
    classes = list(spec.get("class_names") or [])
    shown = ", ".join(f"`{c}`" for c in classes[:MAX_LISTED_CLASSES])
    more = f" and {len(classes) - MAX_LISTED_CLASSES} more (metadata.json)" if len(classes) > MAX_LISTED_CLASSES else ""
    steps = [
        f"1. Decode: {pre.get('decode', '?')}.",
        (f"2. {resize_text[0].upper()}{resize_text[1:]}, {resize.get('interpolation', '?')} interpolation "
         f"({resize.get('library', 'PIL')})."),
        f"3. Center-crop to {pre.get('center_crop', '?')} (crop_pct {pre.get('crop_pct', '?')}).",
        (f"4. Scale: {pre.get('scale', '?')}; normalise (x - mean) / std with mean "
         f"{pre.get('mean', spec.get('mean'))}, std {pre.get('std', spec.get('std'))}; channels "
         f"{pre.get('channel_order', '?')}."),
        (f"5. Feed {pre.get('dtype', 'float32')} {pre.get('layout', 'NCHW')} as input `{inp.get('name', 'input')}` "
         f"of shape {inp.get('shape', '[-1, C, H, W]')}; output `{out.get('name', 'logits')}` "
         f"{out.get('shape', '[-1, classes]')} is logits (argmax = class; softmax for confidences)."),
    ]
    return "\n".join([*steps, "", f"Classes in output order ({len(classes)}): {shown}{more}."])


def _limits_text(meta: Mapping[str, Any], spec: Mapping[str, Any], device: Mapping[str, Any],
                 artifact: Mapping[str, Any], evaluation: Mapping[str, Any]) -> str:
    classes = len(spec.get("class_names") or [])
    size = f"{spec.get('height', '?')}x{spec.get('width', '?')}"
    lines = [
        (f"- For: classifying {spec.get('channels', '?')}-channel images, preprocessed as above to {size}, into "
         f"the {classes} classes listed, with {artifact.get('runtime', '?')} on hardware like "
         f"`{meta.get('device')}`."),
        ("- Every input gets one of those classes: there is no 'none of these' answer, so images unlike the "
         "training data get a confident-looking wrong label."),
        (f"- Accuracy is from this dataset's validation split ({evaluation.get('images', '?')} images, data "
         f"`{(meta.get('lineage') or {}).get('data_hash', '?')}`); other cameras, lighting or classes can do "
         "worse."),
        (f"- Latency and memory were measured on the build host's `{meta.get('device')}` profile "
         f"({device.get('threads', '?')} thread(s), batch {device.get('batch_size', '?')}), normalised to a "
         "reference network; other hardware, thread counts or batch sizes differ."),
    ]
    if artifact.get("precision", "fp32") != "fp32":
        parent = ("" if artifact.get("main", "model.onnx") == "model.onnx" else
                  f"; `model.onnx` is its FP32 parent, `{artifact.get('main')}` the model measured")
        lines.append(f"- {artifact['precision']} weights and activations: the accuracy above is the quantised "
                     f"model's own{parent}.")
    return "\n".join(lines)


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _num(value: Any) -> str:
    return f"{value:.3g}" if _finite(value) and abs(value) < 100 else (f"{value:,.0f}" if _finite(value) else "?")


def _mb(value: Any) -> str:
    return f"{value:.1f} MB" if _finite(value) else "not measured"


def _count(value: Any, unit: str) -> str:
    if not _finite(value):
        return f"? {unit}"
    for scale, prefix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= scale:
            return f"{value / scale:.2f} {prefix}{unit}"
    return f"{value:.0f} {unit}"
