"""What ships beside the library: 24 CC0 ISIC 2016 records (the default calibration data of `run`, `verify`
and `verify-engine`), a polygraphy data-loader script, and the C++ sample's sources.

Installed as package data, so the defaults work outside a checkout too.
"""

from pathlib import Path

BUNDLED_DATA = Path(__file__).resolve().parent / "data" / "isic2016"
