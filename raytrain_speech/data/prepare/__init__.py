"""``raytrain-speech prepare``: an existing corpus (a TSV/JSONL manifest, LibriSpeech, WebDataset tars)
-> one split of our shard format (docs/shards.md), or with ``--index-only`` an index over the tars.

layouts.py finds the inputs and surveys them (probe.py reads audio headers, and decodes each file
when write.py copies it), plan.py numbers and cuts them, write.py writes shards (leaving out what does
not decode in full), resume state, skip list and manifest, run.py ties the phases together
(index.py for ``--index-only``). Ray is imported only by executor.py, and only when ``workers`` is
not 0: everything else is plain functions.
"""

from raytrain_speech.data.prepare.index import index_webdataset
from raytrain_speech.data.prepare.layouts import scan_librispeech, scan_manifest, survey_tar
from raytrain_speech.data.prepare.plan import (
    LAYOUT_HINTS,
    PrepareConfig,
    PrepareOutcome,
    Skip,
    Utterance,
    cut_shards,
    make_plan,
)
from raytrain_speech.data.prepare.run import prepare
from raytrain_speech.data.prepare.write import SKIPPED_FILE, STATE_FILE

__all__ = [
    "LAYOUT_HINTS", "SKIPPED_FILE", "STATE_FILE", "PrepareConfig", "PrepareOutcome", "Skip", "Utterance",
    "cut_shards", "index_webdataset", "make_plan", "prepare", "scan_librispeech", "scan_manifest", "survey_tar",
]
