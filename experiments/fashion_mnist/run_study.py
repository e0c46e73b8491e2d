"""Fashion-MNIST study: AIM pre-training, then an attention probe on the frozen trunk.

    python experiments/fashion_mnist/run_study.py --workdir workdirs/fashion_mnist_study

Stages, each timed:
1. pre-train `configs/fashion_mnist.py` on the 60,000 training images (labels unused);
2. train the attention probe of `configs/probe/fashion_mnist.py` on the frozen pre-trained
   trunk and evaluate it on the 10,000 test images;
3. the same probe on a randomly initialised trunk of the same architecture (baseline);
4. logistic regression on raw pixels (baseline, scikit-learn).

Writes `results.json`, `pretrain_loss.png` and `README.md` beside this script (unless
`--no-write-docs`), with the commands, hardware, wall times and the table.
"""

from __future__ import annotations

import datetime
import importlib.util
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from absl import app, flags, logging

from aim_jax import data_sources, probe, train

HERE = Path(__file__).resolve().parent
NOTES_MARKER = "<!-- Notes below this line are written by hand and kept when the study reruns. -->"
REPO = HERE.parents[1]

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", "workdirs/fashion_mnist_study", "Directory for all stages.")
flags.DEFINE_integer("pretrain_steps", None, "Override the pre-training steps of the config.")
flags.DEFINE_integer("probe_steps", None, "Override the probe steps of the probe config.")
flags.DEFINE_bool("write_docs", True, "Write results.json, pretrain_loss.png and README.md here.")


def load_config(path: Path, arg: str | None = None):
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)


def timed(fn, *args, **kwargs):
    start = time.perf_counter()
    result = fn(*args, **kwargs)
    return result, time.perf_counter() - start


def pixel_logistic_regression(path: str) -> dict[str, float]:
    """Fit multinomial logistic regression on the raw training pixels; return test top-1."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    def load(split):
        source = data_sources.FashionMnistSource(path, split)
        images = np.stack([np.asarray(source[i]["image"]).reshape(-1) for i in range(len(source))])
        labels = np.asarray([int(source[i]["label"]) for i in range(len(source))])
        return images.astype(np.float32) / 255.0, labels

    train_x, train_y = load("train")
    test_x, test_y = load("test")
    scaler = StandardScaler().fit(train_x)
    classifier = LogisticRegression(max_iter=300, C=0.1)
    classifier.fit(scaler.transform(train_x), train_y)
    top1 = float((classifier.predict(scaler.transform(test_x)) == test_y).mean())
    return {"top1": top1, "num_images": int(len(test_y))}


def plot_loss(metrics_path: Path, output: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
    records = [r for r in records if "train/loss" in r]
    steps = [r["step"] for r in records]
    losses = [r["train/loss"] for r in records]
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    ax.plot(steps, losses)
    ax.set_xlabel("step")
    ax.set_ylabel("next-patch loss (normalised pixels)")
    ax.set_title("AIM pre-training on Fashion-MNIST (configs/fashion_mnist.py)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(output)
    plt.close(fig)


def hardware() -> str:
    model = platform.processor() or "unknown CPU"
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        for line in lscpu.splitlines():
            if line.startswith("Model name:"):
                model = line.split(":", 1)[1].strip()
    except (OSError, subprocess.CalledProcessError):
        pass
    return f"{model}, {os.cpu_count()} cores, CPU only"


def write_readme(results: dict, output: Path) -> None:
    rows = results["rows"]
    table = "\n".join(
        f"| {r['method']} | {100 * r['top1']:.2f} | {r['seconds'] / 60:.1f} |" for r in rows
    )
    total = sum(stage["seconds"] for stage in results["stages"]) / 60
    stages = "\n".join(f"| {s['name']} | {s['seconds'] / 60:.1f} |" for s in results["stages"])
    text = f"""# Fashion-MNIST: AIM pre-training read out by an attention probe

The whole study runs with one command:

```bash
python experiments/fashion_mnist/run_study.py --workdir {results["workdir"]}
```

which runs, in order:

```bash
python -m aim_jax.train --config configs/fashion_mnist.py --workdir WORKDIR/pretrain
python -m aim_jax.probe --config configs/probe/fashion_mnist.py \\
    --workdir WORKDIR/probe_pretrained --config.trunk.workdir=WORKDIR/pretrain
python -m aim_jax.probe --config configs/probe/fashion_mnist.py:random \\
    --workdir WORKDIR/probe_random
```

plus logistic regression on raw pixels (scikit-learn, standardised pixels, C = 0.1).
Pre-training uses the 60,000 training images without labels. The probes and the logistic
regression train on the training labels. Every figure is top-1 accuracy on the 10,000 test
images.

Run on {results["date"]} on {results["hardware"]}, with {results["versions"]}.

| method | test top-1 (%) | wall time (min) |
|---|---|---|
{table}

| stage | wall time (min) |
|---|---|
{stages}
| total | {total:.1f} |

Model: {results["model"]}.
The pre-training loss curve of this run is `pretrain_loss.png`.
"""
    if output.exists() and NOTES_MARKER in output.read_text():
        # Hand-written analysis below the marker survives a rerun of the study.
        text += "\n" + NOTES_MARKER + output.read_text().split(NOTES_MARKER, 1)[1]
    output.write_text(text)


def main(argv):
    del argv
    workdir = Path(FLAGS.workdir).absolute()
    workdir.mkdir(parents=True, exist_ok=True)
    pretrain_config = load_config(REPO / "configs" / "fashion_mnist.py")
    if FLAGS.pretrain_steps:
        pretrain_config.total_steps = FLAGS.pretrain_steps
    stages = []

    _, seconds = timed(train.train_and_evaluate, pretrain_config, str(workdir / "pretrain"))
    stages.append({"name": "pre-training", "seconds": seconds})

    probe_results = {}
    for name, variant in (("pretrained", None), ("random", "random")):
        config = load_config(REPO / "configs" / "probe" / "fashion_mnist.py", variant)
        config.trunk.workdir = str(workdir / "pretrain")
        if FLAGS.probe_steps:
            config.total_steps = FLAGS.probe_steps
        result, seconds = timed(probe.train_probe, config, str(workdir / f"probe_{name}"))
        probe_results[name] = (result, seconds)
        stages.append({"name": f"attention probe, {name} trunk", "seconds": seconds})

    pixels, seconds = timed(pixel_logistic_regression, pretrain_config.data.path)
    stages.append({"name": "logistic regression on pixels", "seconds": seconds})

    import jax

    model = pretrain_config.model
    results = {
        "date": datetime.date.today().isoformat(),
        "hardware": hardware(),
        "versions": f"Python {platform.python_version()}, jax {jax.__version__}",
        "workdir": FLAGS.workdir,
        "model": (
            f"width {model.embed_dim}, {model.num_blocks} blocks, {model.num_heads} heads, "
            f"patch {model.patch_size} at {model.img_size[0]}x{model.img_size[1]} px, "
            f"{pretrain_config.total_steps} steps of batch {pretrain_config.batch_size}"
        ),
        "stages": stages,
        "rows": [
            {
                "method": "attention probe, frozen AIM pre-trained trunk",
                "top1": probe_results["pretrained"][0]["top1"],
                "seconds": stages[0]["seconds"] + probe_results["pretrained"][1],
            },
            {
                "method": "attention probe, frozen random trunk",
                "top1": probe_results["random"][0]["top1"],
                "seconds": probe_results["random"][1],
            },
            {
                "method": "logistic regression on raw pixels",
                "top1": pixels["top1"],
                "seconds": stages[-1]["seconds"],
            },
        ],
    }
    (workdir / "results.json").write_text(json.dumps(results, indent=1))
    logging.info("Study results: %s", json.dumps(results["rows"], indent=1))
    if FLAGS.write_docs:
        (HERE / "results.json").write_text(json.dumps(results, indent=1))
        plot_loss(workdir / "pretrain" / "metrics.jsonl", HERE / "pretrain_loss.png")
        write_readme(results, HERE / "README.md")


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    app.run(main)
