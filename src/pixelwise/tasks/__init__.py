"""Task objects: the parts of training, evaluation and reporting that differ per task.

Example:
    >>> from pixelwise.tasks import get_task, list_tasks
    >>> list_tasks()
    ['edges', 'scribbles', 'semantic', 'volume']
"""

from pixelwise.tasks.base import TASKS, Task, get_task, list_tasks, register_task
from pixelwise.tasks import semantic  # noqa: F401  (registers "semantic" and "edges")
from pixelwise.tasks import scribbles  # noqa: F401  (registers "scribbles")
from pixelwise.tasks import volume  # noqa: F401  (registers "volume")

__all__ = ["TASKS", "Task", "get_task", "list_tasks", "register_task"]
