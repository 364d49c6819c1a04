# nodecryptor agent image: Debian's python3 and BCC (python3-bpfcc), iproute2 for operators, and
# the package installed from this build context into a virtualenv that sees Debian's bcc.
#
#   docker build -t REGISTRY/nodecryptor:0.1.0 .
#
# It runs as root with the capabilities the DaemonSet grants (NET_ADMIN, BPF, PERFMON); see
# docs/operator-guide.md for why each is needed and why the image cannot drop to another user.
FROM debian:bookworm-slim

# python3-bpfcc: BCC's Python bindings and libbcc (the PyPI project named "bcc" is an unrelated
# placeholder). xz-utils: BCC unpacks /sys/kernel/kheaders.tar.xz with tar when the host has no
# header package. iproute2: `ip`, `tc` and `ss` for the operator inside the pod.
RUN apt-get update \
 && apt-get install -y --no-install-recommends \
      python3 python3-venv python3-bpfcc iproute2 xz-utils \
 && rm -rf /var/lib/apt/lists/*

# A virtualenv keeps pip away from Debian's externally managed python3; only Debian's bcc
# package is linked into it, as scripts/setup.sh does for development.
ENV VIRTUAL_ENV=/opt/nodecryptor
RUN python3 -m venv "$VIRTUAL_ENV" \
 && ln -s /usr/lib/python3/dist-packages/bcc \
      "$("$VIRTUAL_ENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/bcc"

COPY pyproject.toml README.md /src/
COPY nodecryptor /src/nodecryptor
RUN "$VIRTUAL_ENV/bin/pip" install --no-cache-dir /src && rm -rf /src

# The C sources of the datapath program, compiled by BCC on the node at start-up against the
# host's kernel headers (mounted from /lib/modules and /usr/src).
COPY bpf /usr/share/nodecryptor/bpf
ENV NODECRYPTOR_BPF_DIR=/usr/share/nodecryptor/bpf \
    PATH=/opt/nodecryptor/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1

USER 0:0
ENTRYPOINT ["nodecryptor"]
CMD ["run"]
