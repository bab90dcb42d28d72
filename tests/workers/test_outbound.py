"""workers.outbound.instance_contexts: what an association for queued instances proposes.

End to end with DCMTK's storescp (it picks Explicit VR LE from any list that has it) in
tests/runtime/test_forwarding.py; here the proposal's shape and its bound.
"""

from __future__ import annotations

from workers.outbound import instance_contexts

CT, MR = "1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.5.1.4.1.1.4"
ILE, ELE, EBE = "1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.2"
JPEG_LOSSLESS = "1.2.840.10008.1.2.4.70"


def test_each_held_syntax_in_a_context_of_its_own() -> None:
    """The acceptor chooses within a context, never between contexts: the held syntax
    alone is accepted wherever supported; the little endian ones are the fallback."""
    assert instance_contexts([(CT, EBE)]) == [(CT, [EBE]), (CT, [ELE, ILE])]
    assert instance_contexts([(CT, ILE)]) == [(CT, [ILE]), (CT, [ELE])]
    assert instance_contexts([(CT, ELE)]) == [(CT, [ELE]), (CT, [ILE])]


def test_compressed_alone_and_nothing_proposed_twice() -> None:
    assert instance_contexts([(CT, ILE), (CT, ELE), (MR, JPEG_LOSSLESS), (CT, EBE)]) == [
        (CT, [ELE]), (CT, [ILE]), (MR, [JPEG_LOSSLESS]), (CT, [EBE]), (CT, [ELE, ILE])]


def test_over_the_limit_the_latest_pairs_are_kept_whole() -> None:
    """The last pair is the instance about to be sent: it always fits, with its fallback;
    a pair whose contexts do not all fit is left out, not cut in half."""
    pairs = [(f"1.2.3.{n}", ELE) for n in range(70)]
    contexts = instance_contexts(pairs, limit=128)
    assert len(contexts) == 128
    assert contexts[-2:] == [("1.2.3.69", [ELE]), ("1.2.3.69", [ILE])]
    assert contexts[0] == ("1.2.3.6", [ELE])
    assert len(instance_contexts([(CT, EBE), (MR, ELE)], limit=3)) == 2
