"""onnx-pipeline's conductor: CLI, recipes, run directory, MLflow tracking and stage orchestration."""

__version__ = "0.1.0"
