"""Helpers the tests share, one idea a module (fixtures stay in the conftest files, which
import these):

- `additions`: labelled images to add to a dataset (class folders, .csv/.jsonl lists).
- `archives`: damaged sources (tar members, rewritten archives and .mat files) fed to ingest.
- `backbones`: a seeded torchvision ResNet-18 and the checks that a model holds its backbone.
- `cli`: the library's `flowerml` command run in-process, and the one check of a refusal.
- `deployment`: the deployment tests' tiny runs, worker processes and short zombie rule.
- `forkservers`: stopping the multiprocessing forkserver worker processes were started from.
- `forked_commands`: `flowerml` commands in real child processes forked from the test's own
  process (a kill, two DDP ranks), without a fresh interpreter's imports.
- `http_files`: a scripted HTTP file server for the download tests, and backoff delays recorded.
- `images`: image files a user may hand over (photo-like JPEGs, a bomb's PNG header, cut ones).
- `interrupts`: runs that die at a chosen point, in-process or as a SIGKILLed child.
- `mlflow_servers`: a real `mlflow server` (sqlite, artifacts in a temporary folder), killed and
  started again on the same port.
- `multipart`: a file S3Store uploads in parts, and the uploads a bucket still holds pending.
- `network`: free loopback ports and waiting for a server to answer.
- `paired`: hand-built per-image predictions of two models on the same images.
- `prefect_cli`: many `prefect` and `flowerml` commands (and `python SCRIPT.py`, `python -c`)
  run by one interpreter.
- `prefect_database`: a Prefect database migrated once a session, copied for each server.
- `prefect_runs`: a task run's outcome and a flow run's task-run times, as the server has them.
- `preprocessing`: a real photo through torchvision's weights.transforms() and flowerml's paths.
- `registries`: registries the tests build (the registered run copied, exported; two versions),
  and ONNX/int8 exports made once a session and reused where the weights match.
- `registry_entries`: a registry entry's parts (manifest hash, model name, weights, card).
- `s3_servers`: the S3 servers a session starts besides moto's threaded one.
- `scoring`: a folder of photos to score, and the rows a scoring run wrote.
- `six_samples`: six hand-checked samples of four classes and their loss worked out by hand.
- `stored_documents`: documents as flowerml stored them before their models, to read back.
- `stores`: a store's keys, hard-linked copies of built trees, replacing a file of a copy.
- `synthetic`: the session's synthetic archives, ingests and tiny runs, each built once.
"""
