# embedd: multi-stage image (Rust builder, slim Debian runtime).
#
#   docker build -t embedd .
#   docker run -p 8080:8080 -v ./models/weights:/models -v embedd-data:/data embedd
#
# Build arguments:
#   BUILDER_IMAGE / RUNTIME_IMAGE  base images (defaults: rust:1-bookworm / debian:bookworm-slim)
#   BINARY_FROM   `builder` (default) compiles in the image; `host` copies EMBEDD_BINARY, a binary
#                 built outside (what scripts/container-smoke does where base images cannot be pulled)
#   EMBEDD_BINARY path of that binary in the build context (default target/release/embedd)
#   CARGO_FEATURES extra cargo features for the builder (e.g. `cuda`; see Dockerfile.cuda)
ARG BUILDER_IMAGE=rust:1-bookworm
ARG RUNTIME_IMAGE=debian:bookworm-slim
ARG BINARY_FROM=builder

FROM ${BUILDER_IMAGE} AS builder
ARG CARGO_FEATURES=""
WORKDIR /src
COPY . .
RUN cargo build --release --locked --bin embedd ${CARGO_FEATURES:+--features "$CARGO_FEATURES"} \
 && cp target/release/embedd /embedd

FROM scratch AS host
ARG EMBEDD_BINARY=target/release/embedd
COPY ${EMBEDD_BINARY} /embedd

FROM ${BINARY_FROM} AS binary

FROM ${RUNTIME_IMAGE}
COPY --from=binary /embedd /usr/local/bin/embedd
RUN useradd --system --uid 10001 --home-dir /data --shell /usr/sbin/nologin embedd \
 && mkdir -p /data /models /data/hf \
 && chown -R embedd /data /models
USER embedd
ENV EMBEDD_HOST=0.0.0.0 \
    EMBEDD_PORT=8080 \
    EMBEDD_DATA_DIR=/data \
    EMBEDD_WEIGHTS_DIR=/models \
    HF_HOME=/data/hf
VOLUME ["/data", "/models"]
EXPOSE 8080
HEALTHCHECK --interval=30s --timeout=5s --start-period=120s --retries=3 \
  CMD ["embedd", "healthcheck"]
ENTRYPOINT ["embedd"]
