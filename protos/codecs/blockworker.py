"""Worker process for the ``bsdiff4`` block codec (``python -m protos.codecs.blockworker``).

bsdiff can take minutes on repetitive input, so :mod:`protos.codecs.blockmake` runs it in this
process and kills it at its deadline. Protocol: one JSON task per line on stdin (``old``,
``new``, ``new_off``, ``new_len``, ``old_off``, ``old_len``); for each, stdout gets a u64 length
and the BSDIFF payload of that range. Exits at end of input. Imports no numpy (small process).
"""

from __future__ import annotations

import json
import struct
import sys


def main() -> None:
    from protos.codecs.blocks import bsdiff_range

    out = sys.stdout.buffer
    for line in sys.stdin.buffer:
        t = json.loads(line)
        payload = bsdiff_range(t["old"], t["new"], t["new_off"], t["new_len"], t["old_off"],
                               t["old_len"])
        out.write(struct.pack("<Q", len(payload)))
        out.write(payload)
        out.flush()


if __name__ == "__main__":
    main()
