"""Worker process of the file fuzz tests (tests/test_fuzz_files.py): loads checkpoints named on stdin.

One path per line in; one line out per path: "ok", or "error <ExceptionType>" for a documented error
(LayerSkipError and subclasses, FileNotFoundError), or "bug <ExceptionType>: message" for anything else.
A crash, a hang or exceeding the memory limit shows as the process dying or not answering.
"""
import resource
import sys

import layerskip_ext

if __name__ == "__main__":
    limit = int(sys.argv[1]) if len(sys.argv) > 1 else 0
    if limit:  # address space in bytes: a hostile file must not make the loader allocate without bound
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    print("ready", flush=True)
    for line in sys.stdin:
        path = line.rstrip("\n")
        try:
            layerskip_ext.load(path)
            answer = "ok"
        except (layerskip_ext.LayerSkipError, FileNotFoundError) as e:
            answer = f"error {type(e).__name__}"
        except Exception as e:  # noqa: BLE001  (reported to the test as a bug)
            answer = f"bug {type(e).__name__}: {str(e)[:300]!r}"
        print(answer, flush=True)
