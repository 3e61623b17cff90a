"""Channel sites and exact channel-reuse rewrites of ONNX graphs (onnx-graphsurgeon).

A reuse decision travels as a ``ReuseMap`` (site name -> pairs). ``find_sites``
locates where it can apply in an exported encoder; ``apply_reuse_map``
rewrites the graph with the cheapest exact strategy per site.
"""

from sam_reuse.graphops.reuse_map import ReuseMap, SiteReuse
from sam_reuse.graphops.rewrites import STRATEGIES, apply_reuse_map
from sam_reuse.graphops.sites import Site, find_sites

__all__ = ["ReuseMap", "SiteReuse", "Site", "find_sites", "STRATEGIES", "apply_reuse_map"]
