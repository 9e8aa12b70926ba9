"""The error a user can fix (bad video, config, shapes): its message is one line naming the file or key."""


class SDCError(ValueError):
  pass
