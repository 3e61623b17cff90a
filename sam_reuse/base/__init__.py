"""What every stage stands on: errors, atomic files, imaging, ONNX Runtime sessions, records and the contract.

Nothing here imports a stage, torch or TensorRT.
"""
