"""Does a thread polling with time.sleep(0) slow an asyncio loop thread's Python work? (GIL contention)"""
import asyncio, json, statistics, threading, time
stop = False
def spinner():
    while not stop:
        time.sleep(0)
def work():
    # ~1 ms of pure Python per 'request': JSON round trips, small allocations
    d = {"prompt": "hello world " * 50, "max_tokens": 16, "stream": True}
    for _ in range(60):
        s = json.dumps(d); json.loads(s)
async def main(n=400):
    ts = []
    for _ in range(n):
        t = time.perf_counter()
        work()
        await asyncio.sleep(0)      # a loop turn (epoll) as a request would have
        ts.append(time.perf_counter() - t)
    return statistics.median(ts) * 1e3, sorted(ts)[int(.99 * n)] * 1e3
for rnd in range(3):
    for mode in ("off", "spin"):
        stop = False
        th = threading.Thread(target=spinner, daemon=True) if mode == "spin" else None
        if th: th.start()
        p50, p99 = asyncio.run(main())
        stop = True
        if th: th.join()
        print(f"round {rnd} {mode:5s}: p50 {p50:.3f} ms  p99 {p99:.3f} ms", flush=True)
