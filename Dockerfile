# The slim server: `pipeline serve` with the `serve` extra (ONNX Runtime, uvicorn; no torch, no training
# stack). CPU image by default; the CUDA image is Dockerfile.cuda (same install steps).
#   docker build -t onnx-pipeline-serve .
#   docker run -p 8000:8000 -v $PWD/dist/model-repository:/models onnx-pipeline-serve
#   docker run -p 8000:8000 -v $PWD/runs/digits-cnn:/m onnx-pipeline-serve --model /m/model.onnx --name digits-cnn
# The install steps are the README's ("Serving" > "A slim server"); tests/test_serve_workers.py checks they agree.
FROM python:3.11-slim

WORKDIR /opt/onnx-pipeline
COPY pyproject.toml constraints.txt README.md ./
COPY pipeline ./pipeline
COPY stages ./stages
COPY models ./models
RUN python -m pip install --no-cache-dir -c constraints.txt '.[serve]'

# Not root; models come in through a volume (or KServe's storage initializer at /mnt/models).
RUN useradd --uid 10001 --no-create-home serve
USER 10001
WORKDIR /srv
EXPOSE 8000 8001
# Every worker listens on the port (SO_REUSEPORT); --workers defaults to one per core (at most 8).
ENTRYPOINT ["pipeline", "serve", "--host", "0.0.0.0"]
CMD ["--model-repository", "/models"]
