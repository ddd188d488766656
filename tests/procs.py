"""Process helpers for the tests that kill a parent and check its workers went with it (/proc)."""
import pathlib
import time


def children(pid: int) -> list[int]:
  """The live processes whose parent is ``pid``."""
  out = []
  for stat in pathlib.Path("/proc").glob("[0-9]*/stat"):
    try:
      fields = stat.read_text().rsplit(")", 1)[1].split()
    except OSError:
      continue
    if int(fields[1]) == pid and fields[0] != "Z":
      out.append(int(stat.parent.name))
  return out


def alive(pid: int) -> bool:
  try:
    state = pathlib.Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
  except OSError:
    return False
  return state != "Z"


def running_with(text: str) -> list[int]:
  """Live processes whose command line holds ``text``."""
  out = []
  for cmdline in pathlib.Path("/proc").glob("[0-9]*/cmdline"):
    try:
      if text in cmdline.read_bytes().decode(errors="replace") and alive(int(cmdline.parent.name)):
        out.append(int(cmdline.parent.name))
    except (OSError, ValueError):
      continue
  return out


def still_alive(pids: list[int], timeout_s: float = 10.0) -> list[int]:
  """Those of ``pids`` still alive after waiting up to ``timeout_s`` for all of them to end."""
  deadline = time.monotonic() + timeout_s
  while time.monotonic() < deadline and any(map(alive, pids)):
    time.sleep(0.1)
  return [p for p in pids if alive(p)]
