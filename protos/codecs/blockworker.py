"""Worker process for the ``bsdiff4`` block codec (``python -m protos.codecs.blockworker``).

bsdiff can take minutes on repetitive input, so :mod:`protos.codecs.blocks` runs it in
these processes and kills them at its deadline. Protocol: one JSON task per line on stdin
(``old``, ``new``, ``new_off``, ``new_len``, ``old_off``, ``old_len``, ``try_bsdiff``); for each,
stdout gets a u64 length, a u8 method and the encoded block record. Exits at end of input.
"""

from __future__ import annotations

import json
import struct
import sys


def main() -> None:
    from protos.codecs.blocks import METHOD_NAMES, encode_block

    out = sys.stdout.buffer
    for line in sys.stdin.buffer:
        t = json.loads(line)
        rec, method = encode_block(t["old"], t["new"], t["new_off"], t["new_len"], t["old_off"],
                                   t["old_len"], try_bsdiff=t["try_bsdiff"])
        out.write(struct.pack("<QB", len(rec), METHOD_NAMES.index(method)))
        out.write(rec)
        out.flush()


if __name__ == "__main__":
    main()
