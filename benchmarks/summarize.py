"""One table out of the logs `benchmarks/gpu_suite.sh` writes: model step, data pipeline alone, end to end, each
against the targets of the speed issue.

    python benchmarks/summarize.py bench-out          # the folder the suite wrote ($OUT on a lent machine)

Reads whichever logs are there (a suite split over two calls leaves them in two folders: pass both).
"""

from __future__ import annotations

import argparse
import glob
import os
import re
import sys

# (log name, the backbone the target is for, target images/s or None)
STEP_LOGS = [
    ("step_r50_compile", "resnet50", 3800),
    ("step_cifar_compile", "cifar_resnet18", None),
    ("step_cifar_compile_nosplit", "cifar_resnet18", None),
    ("step_cifar_cudagraphs", "cifar_resnet18", None),
    ("step_v3_vits", "vit_small_patch16_224", None),
    ("step_v3_vits_large", "vit_small_patch16_224", None),
]
BASELINES = ("official-style", "naive Algorithm 1")  # v1/v2 steps, MoCo v3 steps
PIPELINE_LOGS = [
    ("e2e_r50_compile", "resnet50", 3000),
    ("e2e_r50_threads_compile", "resnet50", 3000),
    ("e2e_cifar_cache_compile", "cifar_resnet18", 30000),
    ("e2e_cifar_cache_cudagraphs", "cifar_resnet18", 30000),
]
AUGMENT_LOGS = ["augment_v2"]


def step_setting(text: str) -> tuple[str, str]:
    """(backbone, 'model step, <backbone> <size> px, batch N, K n[, split BN g]') from the header line; MoCo v3 runs
    say so in place of K, and gradient checkpointing where it was on."""
    m = re.search(r"; (\S+), batch (\d+) x (\d+)px, (MoCo v3, )?K=(\d+).*?(?:bn_splits=(\d+))?$", text, re.MULTILINE)
    if not m:
        return "", "model step"
    splits = f", split BN {m.group(6)}" if m.group(6) and m.group(6) != "1" else ""
    negatives = "MoCo v3 (no queue)" if m.group(4) else f"K {int(m.group(5)):,}"
    checkpointing = ", gradient checkpointing" if "grad_checkpointing=True" in text else ""
    return m.group(1), (f"model step, {m.group(1)} {m.group(3)} px, batch {m.group(2)}, {negatives}{splits}"
                        f"{checkpointing}")


def pipeline_setting(text: str) -> tuple[str, str]:
    """(backbone, '<backbone>, <size> px <preset>, batch N') from the header line of `bench_pipeline.py`."""
    m = re.search(r"backbone (\S+), (\d+ px \S+), batch (\d+)", text)
    return (m.group(1), f"{m.group(1)}, {m.group(2)}, batch {m.group(3)}") if m else ("", "pipeline")


def compile_mode(text: str) -> str:
    """' (mode)' where the header line says the encoders were compiled in a mode other than the default, else ''."""
    m = re.search(r"compile[= ]True \(([\w-]+)\)", text)
    return f" ({m.group(1)})" if m and m.group(1) != "default" else ""


def _verdict(value: float, target: int | None, backbone: str, expected: str) -> str:
    if not target:
        return ""
    if backbone != expected:
        return f"target {target:,} is for {expected}"
    return f"target {target:,}: {'met' if value >= target else 'NOT met'}"


def _read(path: str) -> str:
    with open(path) as f:
        return f.read()


def _find(folders: list[str], name: str) -> str | None:
    for folder in folders:
        matches = sorted(glob.glob(os.path.join(folder, f"*{name}.txt")))
        matches = [m for m in matches if os.path.basename(m) in (f"{name}.txt",) or m.endswith(f"-{name}.txt")]
        if matches:
            return matches[-1]
    return None


def step_rows(text: str) -> dict[str, tuple[float, float]]:
    """{implementation: (images/s, peak GiB)} from `bench_model_step.py` output."""
    rows = {}
    for name in ("moco_hf MoCoModel", *BASELINES):
        m = re.search(rf"^{re.escape(name)}\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+|nan)", text, re.MULTILINE)
        if m:
            rows[name] = (float(m.group(3)), float(m.group(4)))
    return rows


def pipeline_rows(text: str) -> list[tuple[str, float, str]]:
    """(what, images/s, note) rows of the table `bench_pipeline.py` prints."""
    rows = []
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) >= 2 and re.fullmatch(r"[\d.]+", cells[1]):
            rows.append((cells[0], float(cells[1]), cells[2] if len(cells) > 2 else ""))
    return rows


def augment_rows(text: str) -> list[tuple[str, float]]:
    """(mode, images/s) rows of the table `bench_augment.py` prints."""
    rows = []
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) >= 4 and re.fullmatch(r"[\d,.]+", cells[3]) and cells[0] != "mode":
            rows.append((cells[0], float(cells[3].replace(",", ""))))
    return rows


def summarize(folders: list[str]) -> list[tuple[str, str, float, str]]:
    """(what, how, images/s, against the target) rows."""
    table = []
    for log, expected, target in STEP_LOGS:
        path = _find(folders, log)
        if path is None:
            continue
        text = _read(path)
        backbone, what = step_setting(text)
        rows = step_rows(text)
        ours = rows.get("moco_hf MoCoModel")
        baseline = next((name for name in BASELINES if name in rows), "official-style")
        base = rows.get(baseline)
        if ours:
            notes = []
            if base:
                notes.append(f"{ours[0] / base[0]:.2f}x the {baseline} step")
                if ours[1] == ours[1] and base[1] == base[1]:  # not nan (CUDA only)
                    notes.append(f"peak {ours[1]:.1f} vs {base[1]:.1f} GiB")
            notes.append(_verdict(ours[0], target, backbone, expected))
            table.append((what, f"moco_hf{compile_mode(text)}", ours[0], "; ".join(n for n in notes if n)))
        if base:
            table.append((what, baseline, base[0], ""))
    for log in AUGMENT_LOGS:
        path = _find(folders, log)
        if path is not None:
            for mode, value in augment_rows(_read(path)):
                table.append(("augmentation alone, two views", mode, value, ""))
    for log, expected, target in PIPELINE_LOGS:
        path = _find(folders, log)
        if path is None:
            continue
        text = _read(path)
        backbone, what = pipeline_setting(text)
        for how, value, note in pipeline_rows(text):
            verdict = _verdict(value, target, backbone, expected) if how.startswith("pretrain.py") else ""
            table.append((what, how + compile_mode(text), value, "; ".join(n for n in (note, verdict) if n)))
    return table


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folders", nargs="+", help="folders holding the suite's logs")
    args = parser.parse_args(argv)
    table = summarize(args.folders)
    if not table:
        print(f"no benchmark logs in {', '.join(args.folders)}")
        return 1
    env = _find(args.folders, "env")
    if env:
        print(" / ".join(line.strip() for line in _read(env).splitlines() if line.strip()))
    print(f"| {'what':<60} | {'how':<56} | {'images/s':>9} | against the target |")
    print(f"|{'-' * 62}|{'-' * 58}|{'-' * 11}|---|")
    for what, how, value, verdict in table:
        print(f"| {what:<60} | {how:<56} | {value:>9,.0f} | {verdict} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
