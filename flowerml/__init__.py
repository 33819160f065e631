"""flowerml, the library: a Flowers-102 classifier kept fresh, one folder per pipeline stage.

Lowest first; a stage imports only from itself and the stages before it (import-linter's layers
contract in pyproject.toml):

core -> io -> data -> models -> training -> evaluation -> registry -> serving -> distillation,
then `settings` (the one reader of the environment) and `schemas`, then `cli` (the commands).

The library never imports Prefect: `tasks/` and `flows/` adapt it to Prefect.
"""
