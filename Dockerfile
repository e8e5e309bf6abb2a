# One image for every role; the container's command picks it (gateway, batcher, workers, Flower).
#
#   CPU (default):  docker build -t asyncinfer:cpu .
#   CUDA:           docker build -t asyncinfer:cuda \
#                     --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu130 .
#
# The CUDA wheels carry their own CUDA runtime, so the slim base is enough; the host needs only
# the NVIDIA driver and container toolkit. Pick the index whose CUDA version the driver supports.
FROM python:3.11-slim

ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

RUN groupadd --system --gid 10001 asyncinfer \
 && useradd --system --uid 10001 --gid asyncinfer --create-home --shell /usr/sbin/nologin asyncinfer

# torch first and on its own layer: it is by far the largest and changes least often.
RUN pip install torch==2.13.0 --index-url "${TORCH_INDEX}" \
 && echo "torch==2.13.0" > /etc/pip-constraints.txt

# The project itself. The constraint keeps `pip install .` from swapping the torch build above
# for another one from PyPI (a CPU image must not grow a CUDA torch, nor the reverse).
COPY . /tmp/src
RUN pip install --constraint /etc/pip-constraints.txt /tmp/src && rm -rf /tmp/src

USER asyncinfer
WORKDIR /home/asyncinfer
EXPOSE 8000 5555
CMD ["python", "-m", "gateway"]
