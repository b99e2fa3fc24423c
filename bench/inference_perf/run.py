"""Drive the gateway (Envoy + epp + simulated pool) with inference-perf, GIE's own benchmark tool.

inference-perf needs Python >= 3.12 and a tokenizer; install it in a venv of its own
and give its path. A local word-level tokenizer is built with that venv's Python
(make_tokenizer.py), so nothing is downloaded.

    python3.12 -m venv /tmp/ipvenv && /tmp/ipvenv/bin/pip install inference-perf
    .venv/bin/python -m bench.inference_perf.run --inference-perf /tmp/ipvenv/bin/inference-perf

The shared-prefix data generator runs against the gateway at a constant rate; the
report directory inference-perf writes is copied under bench/results/.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

from bench.workloads import BASE_MODEL
from epp.stack import Stack, StackOptions

HERE = Path(__file__).resolve().parent


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m bench.inference_perf.run")
    p.add_argument("--inference-perf", required=True, help="path of the inference-perf executable (its own venv)")
    p.add_argument("--rate", type=float, default=10.0)
    p.add_argument("--duration", type=int, default=30)
    p.add_argument("--out", default="bench/results/inference-perf")
    args = p.parse_args()
    exe = Path(args.inference_perf)
    work = Path(tempfile.mkdtemp(prefix="epp-inference-perf-"))
    subprocess.run([str(exe.parent / "python"), str(HERE / "make_tokenizer.py"), str(work / "tokenizer")], check=True)
    with Stack(StackOptions(servers=4, sim_args=["--time-scale", "2", "--num-gpu-blocks", "2048",
                                                  "--max-num-seqs", "32"], epp_args=["--seed", "1"])) as stack:
        config = {
            "load": {"type": "constant", "stages": [{"rate": args.rate, "duration": args.duration}]},
            "api": {"type": "completion", "streaming": True},
            "server": {"type": "vllm", "model_name": BASE_MODEL, "base_url": stack.url, "ignore_eos": True},
            "tokenizer": {"pretrained_model_name_or_path": str(work / "tokenizer")},
            "data": {"type": "shared_prefix", "shared_prefix": {
                "num_groups": 24, "num_prompts_per_group": 20, "system_prompt_len": 2000, "question_len": 40,
                "output_len": 24, "seed": 1}},
            "report": {"request_lifecycle": {"summary": True, "per_stage": True, "per_request": False}},
            "storage": {"local_storage": {"path": str(work / "reports")}},
        }
        cfg_path = work / "config.yml"
        cfg_path.write_text(yaml.safe_dump(config))
        rc = subprocess.run([str(exe), "--config_file", str(cfg_path)], cwd=work).returncode
    out = Path(args.out)
    if (work / "reports").exists():
        if out.exists():
            shutil.rmtree(out)
        shutil.copytree(work / "reports", out)
        (out / "config.yml").write_text(cfg_path.read_text())
        print(f"inference-perf reports copied to {out}")
    sys.exit(rc)


if __name__ == "__main__":
    main()
