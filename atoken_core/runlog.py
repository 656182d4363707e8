"""A run's logs: ``metrics.jsonl`` (training rows), ``eval.jsonl`` (held-out means) and optional
TensorBoard event files, written by the main process only."""

from __future__ import annotations

import json
from typing import Any


class RunLog:
    def __init__(self, fs: Any, out_path: str, *, is_main: bool, tensorboard: bool) -> None:
        self.fs, self.out_path, self.is_main = fs, out_path, is_main
        self.tensorboard = tensorboard
        self.tb = None

    def open(self) -> None:
        """TensorBoard event files under tb/ beside metrics.jsonl, when asked for, the optional
        tensorboard package is installed and the output folder is on the local file system."""
        if not (self.tensorboard and self.is_main and self.fs.protocol in ("file", ("file", "local"))):
            return
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            return
        self.tb = SummaryWriter(f"{self.out_path}/tb")

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()

    def metrics(self, rows: list[dict[str, Any]]) -> None:
        """Training rows to metrics.jsonl (and TensorBoard)."""
        if not rows or not self.is_main:
            return
        if self.tb is not None:
            for row in rows:
                for key, value in row.items():
                    if isinstance(value, (int, float)) and key != "step":
                        self.tb.add_scalar(key, value, row["step"])
            self.tb.flush()
        with self.fs.open(f"{self.out_path}/metrics.jsonl", "a") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")

    def evaluation(self, step: int, results: dict[str, Any]) -> None:
        """Held-out means per modality to eval.jsonl (and TensorBoard), one row per evaluation."""
        if not self.is_main:
            return
        with self.fs.open(f"{self.out_path}/eval.jsonl", "a") as f:
            f.write(json.dumps({"step": step, **{name: r["mean"] for name, r in results.items()}}) + "\n")
        if self.tb is not None:
            for name, r in results.items():
                for metric, value in r["mean"].items():
                    self.tb.add_scalar(f"eval/{name}/{metric}", value, step)

    def truncate(self, upto_step: int) -> None:
        """After a resume, drop rows logged past the checkpoint (they will be logged again)."""
        if not self.is_main:
            return
        for name in ("metrics.jsonl", "eval.jsonl"):
            path = f"{self.out_path}/{name}"
            if not self.fs.exists(path):
                continue
            with self.fs.open(path, "r") as f:
                rows = [line for line in f if line.strip() and json.loads(line)["step"] <= upto_step]
            with self.fs.open(path, "w") as f:
                f.writelines(rows)
