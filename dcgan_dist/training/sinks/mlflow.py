"""The MLflow sink: the resolved config as params, every logged step's numbers as metrics (by step), the sample
grids and the progress animation as artifacts (samples/step_*.png, progress.gif), and the final checkpoint's
path as the tag `final_checkpoint`.

The tracking server is MLflow's own setting, MLFLOW_TRACKING_URI (unset: MLflow's default, ./mlruns); the
experiment MLFLOW_EXPERIMENT_NAME, else "dcgan_dist"; the MLflow run is named after run.name. Its run id is in
the sink's state (saved in checkpoints): a resumed run continues the same MLflow run. Install with
`pip install -e ".[mlflow]"`. Under Ray the driver's MLFLOW_* variables are forwarded to the workers.
"""

from __future__ import annotations

import os
import time
from typing import Any

from dcgan_dist.config import flat_settings, show
from dcgan_dist.training.sinks.base import RunIdSink, scalar_items

EXPERIMENT = "dcgan_dist"


class MlflowSink(RunIdSink):
    library = "mlflow"
    extra = "mlflow"
    service = "MLflow"
    client: Any = None

    def start(self, step: int) -> None:
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        self.client = client = MlflowClient()  # MLFLOW_TRACKING_URI, as MLflow reads it
        if self.run_id is not None:  # a resume: the same MLflow run
            existing = client.get_run(self.run_id).data.params
            client.update_run(self.run_id, status="RUNNING")
        else:
            name = os.environ.get("MLFLOW_EXPERIMENT_NAME") or EXPERIMENT
            experiment = client.get_experiment_by_name(name)
            experiment_id = experiment.experiment_id if experiment else client.create_experiment(name)
            self.run_id = client.create_run(experiment_id, run_name=self.ctx.cfg.run.name).info.run_id
            existing = {}
        # A param cannot change once logged: a resume with other settings (a higher train.max_steps) adds only the
        # new keys; config.yaml in the run dir is what this session used.
        params = [Param(k, show(v)[:6000]) for k, v in flat_settings(self.ctx.cfg) if k not in existing]
        for i in range(0, len(params), 100):  # MLflow takes at most 100 params a call
            client.log_batch(self.run_id, params=params[i : i + 100])
        self.ctx.say(f"MLflow: run {self.run_id} at {client.tracking_uri}")

    def scalars(self, record: dict) -> None:
        from mlflow.entities import Metric

        if self.client is None:
            return
        now, step = int(time.time() * 1000), record["step"]
        metrics = [Metric(k, v, now, step) for k, v in scalar_items(record)]  # swd_per_class: swd_per_class/<class>
        self.client.log_batch(self.run_id, metrics=metrics)

    def image(self, key: str, image, step: int, caption: str = "") -> None:
        if self.client is not None:
            self.client.log_image(self.run_id, image, artifact_file=f"{key}/step_{step:07d}.png")

    def animation(self, key: str, gif: bytes, step: int) -> None:
        if self.client is not None:
            self._artifact(f"{key}.gif", gif)

    def _artifact(self, name: str, data: bytes) -> None:
        import tempfile
        from pathlib import Path

        with tempfile.TemporaryDirectory() as folder:
            path = Path(folder) / name
            path.write_bytes(data)
            self.client.log_artifact(self.run_id, str(path))

    def close(self, step: int, checkpoint: str | None, outcome: str) -> None:
        if self.client is None:
            return
        if checkpoint:
            self.client.set_tag(self.run_id, "final_checkpoint", checkpoint)
        self.client.set_tag(self.run_id, "final_step", str(step))
        # MLflow's run states: a stopped run is KILLED until a resume sets it RUNNING again
        self.client.set_terminated(self.run_id, {"finished": "FINISHED", "stopped": "KILLED"}.get(outcome, "FAILED"))
        self.client = None


SINK = MlflowSink
