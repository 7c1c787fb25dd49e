"""Fine-tuning under ``accelerate launch`` with two CPU processes (gloo), SPEC §7.

The test launches this file itself: as a script it checks, in every process, that accelerate
sees two processes and which one it is, records that, then runs ``sap finetune`` exactly as
``python -m sap.finetune`` / ``accelerate launch -m sap.finetune`` would.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_two_process_cpu_run_under_accelerate_launch(tmp_path):
    sys.path.insert(0, str(HERE))
    from test_finetune import micro_cohort

    cohort = micro_cohort(tmp_path / "cohort")
    run = tmp_path / "run"
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",  # one torch thread per process on a 2-core machine
        "CUDA_VISIBLE_DEVICES": "",
        "SAP_DDP_CHECK_DIR": str(tmp_path / "ranks"),
    }
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
        "--main_process_port", str(_free_port()), __file__,
        "--config", "tiny", "--data", str(cohort), "--out", str(run), "--init", "scratch", "--fold", "1",
        "--set", "model.patch_size=[64,64,64]", "--set", "finetune.max_steps=2", "--set", "finetune.val_every_steps=2",
        "--set", "finetune.val_fraction=0.34", "--set", "cv.k=3", "--set", "infer.overlap=0.0", "--no-progress",
    ]  # fmt: skip
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = [json.loads(p.read_text()) for p in sorted((tmp_path / "ranks").glob("rank*.json"))]
    assert len(ranks) == 2
    assert sorted(r["process_index"] for r in ranks) == [0, 1]
    assert all(r["num_processes"] == 2 and r["backend"] == "gloo" for r in ranks)
    out = run / "baseline" / "fold_1"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["processes"] == 2 and summary["steps"] == 2
    assert summary["patches_per_epoch"] % 2 == 0  # padded to a multiple of world × batch
    assert (out / "best.pt").is_file() and (out / "last.pt").is_file()


if __name__ == "__main__":  # one process of the launched run
    import torch
    from accelerate import PartialState

    from sap.cli import main

    state = PartialState(cpu=not torch.cuda.is_available())  # as make_accelerator builds it
    assert state.num_processes == 2, state.num_processes
    folder = Path(os.environ["SAP_DDP_CHECK_DIR"])
    folder.mkdir(parents=True, exist_ok=True)
    record = {
        "process_index": state.process_index,
        "num_processes": state.num_processes,
        "backend": state.backend,
    }
    (folder / f"rank{state.process_index}.json").write_text(json.dumps(record))
    sys.exit(main(["finetune", *sys.argv[1:]]))
