"""The Z-Image family (docs/DESIGN.md §2.8): anatomy, the AD forward and the `ModelFamily` answers."""

from .family import ZIMAGE, ZImageFamily

__all__ = ["ZIMAGE", "ZImageFamily"]
