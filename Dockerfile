# kmsd in a container beside the database. The store and the socket directory are volumes;
# the database container mounts the same socket volume. The KEK comes from a mounted secret.
#
#   docker build -t kmsd .
#   docker run -d --name kmsd -v kms-store:/var/lib/kms -v kms-socket:/run/kms \
#     -v /path/to/kek:/run/secrets/kek:ro kmsd

FROM python:3.11-slim-bookworm AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY kms_server ./kms_server
COPY kms_client ./kms_client
# docker/wheels/ may hold pre-fetched wheels (docker/test.sh fills it where the build
# cannot reach PyPI itself); when it does, the build installs from it alone.
COPY docker/wheels /wheels
RUN if ls /wheels/*.whl >/dev/null 2>&1; then \
        export PIP_NO_INDEX=1 PIP_FIND_LINKS=/wheels; fi \
    && python3 -m venv /opt/kms \
    && /opt/kms/bin/pip install --no-cache-dir --upgrade pip==24.2 \
    && /opt/kms/bin/pip install --no-cache-dir .

FROM python:3.11-slim-bookworm
COPY --from=build /opt/kms /opt/kms
RUN groupadd --system --gid 990 kms \
    && useradd --system --uid 990 --gid kms --home-dir /var/lib/kms --shell /usr/sbin/nologin kms \
    && install -d -o kms -g kms -m 0700 /var/lib/kms \
    && install -d -o kms -g kms -m 0750 /run/kms
COPY docker/entrypoint.sh /usr/local/bin/kmsd-entrypoint
ENV PATH=/opt/kms/bin:$PATH \
    KMS_SOCKET=/run/kms/kms.sock \
    PYTHONDONTWRITEBYTECODE=1
USER 990:990
VOLUME ["/var/lib/kms", "/run/kms"]
HEALTHCHECK --interval=10s --timeout=3s --start-period=10s --retries=3 \
    CMD ["kms", "--timeout", "2", "ping"]
ENTRYPOINT ["/usr/local/bin/kmsd-entrypoint"]
CMD ["serve", "--store", "/var/lib/kms", "--socket", "/run/kms/kms.sock", "--socket-mode", "0660", "--kek-file", "/run/secrets/kek"]
