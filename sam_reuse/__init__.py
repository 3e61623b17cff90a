"""sam-reuse: parameter-free domain adaptation of Segment Anything models by channel reuse, shipped as ONNX
and TensorRT engines.

Layers, each importing only those below it (checked by import-linter, see pyproject.toml):

* ``sam_reuse.cli``: the ``export-and-tune`` command, one module per command group;
* ``sam_reuse.finetune``: adapters (LoRA, SCT, SFA, SAM-COBOT), trained with torch;
* ``sam_reuse.exporter`` (torch -> ONNX, TensorRT engines, runtime wrappers) and
  ``sam_reuse.calibrate`` (calibration data, scoring, search, shipping rule; no torch), side by side;
* ``sam_reuse.graphops``: channel sites and exact ONNX rewrites;
* ``sam_reuse.base``: errors, atomic files, imaging, ONNX Runtime sessions, records, the tensor-name contract.
"""

__version__ = "0.1.0"
