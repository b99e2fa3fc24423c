"""Coverage-guided fuzzing with atheris (libFuzzer), for long local runs; CI runs the hypothesis tests.

    pip install atheris
    python -m tests.fuzz.atheris_fuzz body    [libFuzzer flags, e.g. -max_total_time=600 -jobs=2 CORPUS_DIR]
    python -m tests.fuzz.atheris_fuzz metrics [...]
    python -m tests.fuzz.atheris_fuzz stream  [...]

`body`: new_request + parse_body on any path and bytes: an InferenceRequest or a 400 EppError.
`metrics`: extract on any text, for every engine: a snapshot or MetricsParseError.
`stream`: the input is cut into protobuf messages (2-byte big-endian length, then the bytes); each
one that decodes as a ProcessingRequest goes to a PickStream as the processor feeds it; every
answer must be valid (tests/fuzz/fuzz_checks.py), and once the stream closes and the grace passes,
no exchange is open and no endpoint has anything in flight.
Any other exception or a failed check is a crash libFuzzer reports, with the input that caused it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys

import atheris

with atheris.instrument_imports():
    from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
    from google.protobuf.message import DecodeError

    from epp.datalayer.engines import ENGINES
    from epp.datalayer.scraper import MetricsParseError, extract
    from epp.datastore import Datastore, Endpoint, parse_hostport
    from epp.director import Director
    from epp.errors import EppError
    from epp.exchanges import Exchanges
    from epp.extproc.stream import HANDLERS, PickStream
    from epp.handoff import Handoffs
    from epp.requests import new_request, parse_body
    from epp.scheduling import picker_config

from tests.fuzz.fuzz_checks import as_response, check_answers, check_error_body

PATHS = ["/v1/completions", "/v1/chat/completions", "/v1/embeddings", "/v1/models", "/other"]
POOL = ["127.0.0.1:18001", "127.0.0.1:18002"]  # never connected to: they only name the pool


def fuzz_body(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    path = PATHS[fdp.ConsumeIntInRange(0, len(PATHS) - 1)]
    error: EppError | None = None
    try:
        parse_body(new_request(path, {}), fdp.ConsumeBytes(fdp.remaining_bytes()))
    except EppError as e:
        error = e
    if error is not None:
        assert error.http_status == 400, repr(error)
        check_error_body(error.body())


def fuzz_metrics(data: bytes) -> None:
    text = data.decode("utf-8", "replace")
    for mapping in ENGINES.values():
        with contextlib.suppress(MetricsParseError):
            extract(text, mapping, now=1.0)


def messages(data: bytes) -> list[pb.ProcessingRequest]:
    out = []
    i = 0
    while i + 2 <= len(data):
        n = int.from_bytes(data[i:i + 2], "big")
        chunk, i = data[i + 2:i + 2 + n], i + 2 + n
        try:
            out.append(pb.ProcessingRequest.FromString(chunk))
        except DecodeError:
            continue
    return out


async def drive_stream(msgs: list[pb.ProcessingRequest]) -> None:
    ds = Datastore()
    ds.set_endpoints([Endpoint(*parse_hostport(p)) for p in POOL])
    exchanges = Exchanges(Director(ds, picker_config.default_config(seed=1)), None, observer_grace=0.0)
    stream = PickStream(exchanges, Handoffs(), 4096)
    try:
        for msg in msgs:
            kind = msg.WhichOneof("request")
            if kind is None or msg.observability_mode:
                continue
            answers = [as_response(a) for a in HANDLERS[kind](stream, msg)]
            check_answers(kind, answers, POOL)
            if stream.ended:
                break
    finally:
        stream.close()
    for _ in range(3):
        await asyncio.sleep(0)  # the grace of 0 s passes
    assert not exchanges.open_exchanges, "an exchange was never released"
    assert all(ep.inflight == 0 for ep in ds.all_endpoints()), [ep.inflight for ep in ds.all_endpoints()]


_loop = asyncio.new_event_loop()


def fuzz_stream(data: bytes) -> None:
    _loop.run_until_complete(drive_stream(messages(data)))


TARGETS = {"body": fuzz_body, "metrics": fuzz_metrics, "stream": fuzz_stream}


def main() -> None:
    if len(sys.argv) < 2 or sys.argv[1] not in TARGETS:
        sys.exit(f"usage: python -m tests.fuzz.atheris_fuzz {{{','.join(TARGETS)}}} [libFuzzer flags]")
    target = TARGETS[sys.argv[1]]
    logging.disable(logging.WARNING)  # epp warns of each 5xx it answers; millions of runs need no log
    atheris.Setup([sys.argv[0], *sys.argv[2:]], target)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
