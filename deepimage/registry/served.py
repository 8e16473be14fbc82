"""The model file MLflow runs to build a logged deepimage model (MLflow's "models from code"):
a copy of it sits in the model folder, beside the deepimage package (code_paths), and the
weights and JSON description are the model's artifacts."""
import mlflow

from deepimage.registry.pyfunc import ClassifierModel

mlflow.models.set_model(ClassifierModel())
