"""Pure, Beam-free operations of the Tempo pipeline (video, SVLM, cache, allocation, shards)."""

import os as _os

__version__ = "0.1.0"

# gcsfs probes every bucket's type (~60 s per filesystem on emulators, and hundreds of
# "Could not determine bucket type" log lines) unless this is off; it is read when gcsfs is
# imported, which happens after this package. Set it to "true" yourself to keep the probe.
_os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")
