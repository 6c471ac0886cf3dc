"""The worked reward example at its documented path, ``lit_dash.rewards.examples.FormatBonusModule``.

It is defined in :mod:`lit_dash.examples`: it subclasses the module, which imports the rewards, so
defining it here would import the top of the package from a leaf. This re-export is the one import
from ``rewards`` back up (scripts/import_graph.py counts it).
"""

from lit_dash.examples import FormatBonusModule

__all__ = ["FormatBonusModule"]
