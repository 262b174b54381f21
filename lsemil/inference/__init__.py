"""The one prediction path: `engine` loads a checkpoint (`load`) and runs the model on batches
(`Predictor`), for evaluation, prediction and reproduction alike.
"""
