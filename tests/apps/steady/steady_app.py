"""Test app that only answers: it must keep serving while other apps misbehave."""

from fogline import App

app = App("steady")
count = 0


@app.route("GET", "/ping")
async def ping(req, ctx) -> dict[str, int]:
    global count
    count += 1
    return {"ok": 1, "count": count}
