"""The explain API: why a request would go where it goes, without sending it.

The server side answers epp.explain.v1.Explain on its own port, bound to 127.0.0.1
(`--explain-port`): what it tells (every pod's load, whether a prompt's prefix is
cached somewhere) is for an operator inside the pod, never for a client of the
gateway. `epp explain` is its client and prints a table (or JSON) of every candidate
with each scorer's score, the weighted total and the pick.
"""

from __future__ import annotations

import grpc
from google.protobuf import json_format

from epp import errors
from epp._proto import explain_pb2 as pb
from epp._proto import explain_pb2_grpc as pb_grpc
from epp.director import Director
from epp.requests import new_request, parse_body


class ExplainService(pb_grpc.ExplainServicer):
    def __init__(self, director: Director) -> None:
        self.director = director

    async def Explain(self, request: pb.ExplainRequest, context: grpc.aio.ServicerContext) -> pb.ExplainResponse:
        return await explain(self.director, request)


async def explain(director: Director, request: pb.ExplainRequest) -> pb.ExplainResponse:
    headers = {k.lower(): v for k, v in request.headers.items()}
    req = new_request(request.path or "/v1/completions", headers, director.config.parsers)
    out = pb.ExplainResponse()
    try:
        parse_body(req, request.body)
    except errors.EppError as e:
        _set_error(out, e)
        return out
    if director.scheduler.prepares:
        await director.scheduler.prepare(req)  # as a pick does: the same token ids, the same scores
    run = director.dry_run(req, list(request.subset) or None)
    out.model, out.target_model, out.model_rewrite = req.model, req.target_model, run.rewrite or ""
    out.objective, out.priority = req.objective, req.priority
    out.pool_saturated = bool(run.candidates) and director.saturated(run.candidates)
    if run.error is not None:
        _set_error(out, run.error)
    profile = director.scheduler.profiles[0]
    out.profile = profile.name
    out.scorers.extend(pb.ScorerWeight(name=ws.scorer.name, weight=ws.weight) for ws in profile.scorers)
    result = run.result
    ranks: dict[int, int] = {}
    scored: dict[int, int] = {}
    if result is not None:
        scored = {id(ep): i for i, ep in enumerate(result.candidates)}
        if run.error is None:
            ranks = {id(ep): r for r, ep in enumerate(result.targets)}
            out.targets.extend(ep.hostport for ep in result.targets)
    now, staleness = director.datastore.now(), director.datastore.staleness
    rows = []
    for ep in run.candidates:
        c = pb.Candidate(name=ep.name, address=ep.hostport, rank=ranks.get(id(ep), -1))
        i = scored.get(id(ep))
        if i is not None and result is not None:
            c.passed_filters = True
            c.total = result.totals[i]
            for name, values in result.scores.items():
                c.scores[name] = values[i]
        m = ep.fresh_metrics(now, staleness)
        c.metrics.inflight = ep.inflight
        if m is not None:
            c.metrics.fresh = True
            c.metrics.waiting, c.metrics.running, c.metrics.kv_usage = m.waiting, m.running, m.kv_usage
            c.metrics.active_adapters.extend(sorted(m.active_adapters))
            c.metrics.waiting_adapters.extend(sorted(m.waiting_adapters))
            c.metrics.max_lora = m.max_lora
        rows.append(c)
    rows.sort(key=lambda c: (c.rank < 0, c.rank, not c.passed_filters, -c.total, c.name))
    out.candidates.extend(rows)
    return out


def _set_error(out: pb.ExplainResponse, e: errors.EppError) -> None:
    out.error.http_status, out.error.code = e.http_status, e.code
    out.error.message, out.error.reason = e.message, e.reason or ""


def query(
    server: str, body: bytes, *, path: str = "/v1/completions", headers: dict[str, str] | None = None,
    subset: list[str] | None = None, timeout: float = 5.0,
) -> pb.ExplainResponse:
    """Ask a running epp (its explain port) to explain a request: a blocking client, for the CLI and scripts."""
    with grpc.insecure_channel(server) as channel_:
        stub = pb_grpc.ExplainStub(channel_)
        request = pb.ExplainRequest(path=path, headers=headers or {}, body=body, subset=subset or [])
        return stub.Explain(request, timeout=timeout)


def to_json(resp: pb.ExplainResponse) -> str:
    return json_format.MessageToJson(resp, preserving_proto_field_name=True, always_print_fields_with_no_presence=True)


def render(resp: pb.ExplainResponse) -> str:
    """A human-readable report: the request, then one row per candidate, the pick first."""
    lines = []
    model = resp.model if resp.target_model in ("", resp.model) else f"{resp.model} -> {resp.target_model}"
    if resp.model_rewrite:
        model += f" (InferenceModelRewrite {resp.model_rewrite})"
    lines.append(f"model: {model}")
    lines.append(f"objective: {resp.objective or '(none)'}  priority: {resp.priority}  "
                 f"pool saturated: {'yes' if resp.pool_saturated else 'no'}")
    if resp.HasField("error"):
        lines.append(f"rejected: {resp.error.http_status} {resp.error.reason}: {resp.error.message}")
    else:
        lines.append(f"pick: {resp.targets[0] if resp.targets else '-'}"
                     + (f"  fallbacks: {', '.join(resp.targets[1:])}" if len(resp.targets) > 1 else ""))
    scorers = [s.name for s in resp.scorers]
    lines.append(f"profile {resp.profile!r}: " + ", ".join(f"{s.name} x{s.weight:g}" for s in resp.scorers))
    short = [s.removesuffix("-scorer") for s in scorers]
    header = ["", "endpoint", "total", *short, "waiting", "running", "kv", "inflight", "adapters"]
    table = [header]
    for c in resp.candidates:
        mark = "pick" if c.rank == 0 else (f"#{c.rank}" if c.rank > 0 else ("" if c.passed_filters else "filtered"))
        scores = [f"{c.scores[s]:.2f}" if s in c.scores else "-" for s in scorers]
        m = c.metrics
        load = [str(m.waiting), str(m.running), f"{m.kv_usage:.0%}"] if m.fresh else ["?", "?", "?"]
        adapters = ",".join(m.active_adapters) or "-"
        total = f"{c.total:.2f}" if c.passed_filters else "-"
        table.append([mark, f"{c.name} ({c.address})" if c.name != c.address else c.address, total, *scores,
                      *load, str(m.inflight), adapters])
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    for row in table:
        lines.append("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())
    return "\n".join(lines)
