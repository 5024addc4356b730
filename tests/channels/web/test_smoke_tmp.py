from tests.channels.web.chatclient import ChatClient, new_session

async def test_smoke(live_server):
    s = await new_session(live_server.url)
    print(s)
    c, frames = await ChatClient.start(live_server.ws_url, s["token"])
    print(frames)
    for text in ["I want a refund", "HL26110842", "it arrived damaged"]:
        fr = await c.say(text)
        for f in fr: print(f)
    await c.send({"type": "quick_reply", "id": "q1", "payload": "Yes, refund"})
    for f in await c.turn(): print(f)
    await c.send({"type": "rating", "id": "r1", "value": 5})
    for f in await c.turn(): print(f)
    await c.ws.close()
