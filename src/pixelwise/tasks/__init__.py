"""Task objects: the parts of training, evaluation and reporting that differ per task.

Example:
    >>> from pixelwise.tasks import get_task, list_tasks
    >>> list_tasks()
    ['edges', 'instance', 'scribbles', 'semantic', 'volume']
"""

from pixelwise.tasks.base import TASKS, Task, get_task, list_tasks, register_task
from pixelwise.tasks import instance, scribbles, semantic, volume  # noqa: F401  (each registers its tasks)

__all__ = ["TASKS", "Task", "get_task", "list_tasks", "register_task"]
