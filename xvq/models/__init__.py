"""Model families. Importing this package registers every family module below."""
from xvq.models.base import Family, Hparams, OutTensor, SourceTensor, families, family_for, register  # noqa: F401
from xvq.models import llama, xverse, xverse_moe  # noqa: F401,E402  (registration order: general first)
