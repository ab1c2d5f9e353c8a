"""Release: the package that goes public, after validate: model cards, checksums, the laptop-fit
table, the hub files and upload commands (the pipeline that builds it: xvq.pipeline)."""
from xvq.release import card, package, publish
from xvq.release.package import verify
from xvq.release.summary import summary_lines

__all__ = ["card", "package", "publish", "summary_lines", "verify"]
