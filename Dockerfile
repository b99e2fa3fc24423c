# epp's image. Build it with deploy/image/build, which makes the wheels installed here (the build
# needs no network) and, where no registry is reachable, the Debian base image:
#
#   deploy/image/build [--tag epp:0.1.0] [--base python:3.11-slim]
#
# It runs as upstream's EPP container does: the Pod gives flags only (`epp --pool-name ...` is
# `epp serve ...`), as uid 65532, with a read-only root filesystem (epp writes nothing; a tmpfs /tmp
# is enough for any library that wants one).
ARG BASE_IMAGE=epp-base:bookworm

FROM ${BASE_IMAGE} AS install
# Marks what deploy/image/build made, so it can prune its own leftovers and nothing else.
LABEL io.epp.image-build=1
COPY build/image/wheels /wheels
# pip runs from its wheel and is not installed; the bytecode is compiled now, as nothing can be
# written at run time. xds-protos carries an older copy of opentelemetry-proto's modules:
# opentelemetry-proto is installed again so that --tracing's exporter finds its own.
RUN set -- /wheels/pip-*.whl \
 && python3 -m venv --without-pip /opt/epp \
 && /opt/epp/bin/python "$1/pip" install -q --no-index --find-links /wheels --no-cache-dir \
      --disable-pip-version-check --no-warn-script-location "epp[tracing]" \
 && /opt/epp/bin/python "$1/pip" install -q --no-index --find-links /wheels --no-cache-dir \
      --disable-pip-version-check --force-reinstall --no-deps opentelemetry-proto \
 && /opt/epp/bin/python -c "import opentelemetry.exporter.otlp.proto.grpc.trace_exporter" \
 && /opt/epp/bin/epp --help >/dev/null

FROM ${BASE_IMAGE}
LABEL io.epp.image-build=1
COPY --from=install /opt/epp /opt/epp
ENV PATH=/opt/epp/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
USER 65532:65532
WORKDIR /tmp
# ext_proc gRPC, gRPC health, HTTP pick, Prometheus /metrics.
EXPOSE 9002 9003 9004 9090
ENTRYPOINT ["/opt/epp/bin/epp"]
