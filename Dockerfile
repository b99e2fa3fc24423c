# The EPP's container: `docker build -t epp . && docker run -p 9002:9002 -p 9003:9003 -p 9090:9090 epp --endpoints ...`
FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY epp ./epp
RUN pip install --no-cache-dir . && useradd --uid 65532 --no-create-home epp
USER 65532
EXPOSE 9002 9003 9090
ENTRYPOINT ["epp", "serve"]
