"""Jobs on top of the editing methods: forget private data (and, next, detox and debias).

A job turns the user's data into edit requests, calls a method, and measures its own
metric before and after; it returns a :class:`~lmpatch.patch.Patch` like any edit and
never changes weights itself.
"""
