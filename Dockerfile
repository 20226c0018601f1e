# dcgan_dist on the official Ray image (Ray 2.60.0, Python 3.11: the versions the project pins).
#
# CPU image (cpu-smoke overlay):
#   docker build -t ghcr.io/your-org/dcgan-dist:0.1.0-cpu .
# GPU image (gpu and raycluster overlays): the -gpu Ray image (CUDA) and torch's default Linux wheel (CUDA):
#   docker build -t ghcr.io/your-org/dcgan-dist:0.1.0-gpu \
#     --build-arg RAY_IMAGE=rayproject/ray:2.60.0-py311-gpu --build-arg TORCH_INDEX_URL= .
#   docker push ghcr.io/your-org/dcgan-dist:0.1.0-gpu
ARG RAY_IMAGE=rayproject/ray:2.60.0-py311-cpu
FROM ${RAY_IMAGE}

# Empty = the default package index (its Linux torch wheels are CUDA builds).
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu

WORKDIR /home/ray/dcgan_dist
RUN if [ -n "$TORCH_INDEX_URL" ]; then \
        pip install --no-cache-dir torch==2.13.0 --index-url "$TORCH_INDEX_URL"; \
    else \
        pip install --no-cache-dir torch==2.13.0; \
    fi
COPY --chown=1000:100 pyproject.toml README.md ./
COPY --chown=1000:100 dcgan_dist ./dcgan_dist
COPY --chown=1000:100 configs ./configs
# Editable, so `--config debug` finds the presets in ./configs; ray[default] is already in the image.
RUN pip install --no-cache-dir -e .

USER 1000
ENV PYTHONUNBUFFERED=1
