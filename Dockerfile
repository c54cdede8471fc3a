# mergebot on a GPU machine or as a Docker Space: the Space's server (UI, JSON API, worker,
# clock) on port 7860. The same image runs a worker alone: `docker run IMAGE mergebot worker`.
FROM python:3.11-slim

RUN useradd --create-home --uid 1000 user
# A C++ compiler: a search's merge kernels compile (torch.compile) on the CPU and, through
# Triton, on the GPU; without one they run eagerly, several times slower, with the same results.
RUN apt-get update && apt-get install -y --no-install-recommends g++ \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /home/user/app

# PyPI's Linux build of torch carries CUDA: merges run on the GPU when one is visible.
RUN pip install --no-cache-dir torch==2.13.0

COPY --chown=user pyproject.toml README.md spaces_app.py ./
COPY --chown=user merge_engine ./merge_engine
COPY --chown=user service ./service
RUN pip install --no-cache-dir .

USER user
ENV HOME=/home/user \
    MERGEBOT_WORK_DIR=/home/user/data \
    GRADIO_SERVER_NAME=0.0.0.0 \
    GRADIO_SERVER_PORT=7860
EXPOSE 7860
# Up means the JSON API answers; start-up (the first run downloads nothing, but DBOS and Gradio
# take a while on a small CPU) gets five minutes.
HEALTHCHECK --interval=30s --timeout=10s --start-period=5m --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:7860/api/health', timeout=8)"]
CMD ["mergebot", "serve", "--host", "0.0.0.0", "--port", "7860"]
