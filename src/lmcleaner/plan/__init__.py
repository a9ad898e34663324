"""``lmcleaner plan``: what recording and unlearning a run will cost, before anything runs.

``shapes`` builds the model on the meta device (no weights) from a preset, a
config file, a local directory, a table of known models (``known``) or the
hub; ``estimate`` turns shapes, the batch plan and the recorder settings into
bytes (checkpoints, log, exports) and gradient-equivalents (replay and
LMCleaner for a request of a given age); ``cli`` prints a table or JSON.
Nothing heavy is imported here, so the command line registers ``plan`` for free.
"""

__all__ = ["make_plan", "model_shape"]


def __getattr__(name):
    if name == "make_plan":
        from .estimate import make_plan

        return make_plan
    if name == "model_shape":
        from .shapes import model_shape

        return model_shape
    raise AttributeError(name)
