"""
The platform's HTTP JSON API under C{/api/}.  Every request needs the
platform's API token (L{Platform.api_token <everest_agent.platform.core.Platform>}):
C{Authorization: Bearer <token>}; without it the answer is 401, and a
request body is not even read (L{everest_agent.platform.files.PlatformRequest}).
Loopback does not keep other local users out.

    POST /api/tasks                {"spec": {...}, "taskId"?, "agent"?, "context"?} -> 201 {"taskId"}
    GET  /api/tasks                -> [{taskId, agent, state, info}]
    GET  /api/tasks/<id>           -> {taskId, agent, state, info, history, messages,
                                       context, outputData, ...}

A spec is sent to the agent as it is: native, or in the Everest dialect
(C{inputData}/C{outputData}); C{context}, an object, follows it in
C{TASK_SUBMIT}.  C{outputData} is what the task's C{STAGED_OUT} reported.
    POST /api/tasks/<id>/cancel    -> {"taskId", "canceled": bool}
    POST /api/tasks/<id>/message   {"text": ...} -> {"taskId"}
    GET  /api/agents               -> [{name, connected, lastSeq, resource}]
"""

import json

from twisted.logger import Logger
from twisted.web import http, resource

from everest_agent.platform.files import bearer_token

log = Logger(namespace="everest_agent.platform.api")


class ApiError(Exception):
    def __init__(self, code, message):
        super().__init__(message)
        self.code = code
        self.message = message


def _json(request, code, body):
    request.setResponseCode(code)
    request.setHeader(b"content-type", b"application/json")
    request.setHeader(b"cache-control", b"no-store")
    return json.dumps(body).encode("utf-8") + b"\n"


def _body(request):
    request.content.seek(0)
    raw = request.content.read()
    try:
        body = json.loads(raw or b"{}")
    except ValueError as e:
        raise ApiError(http.BAD_REQUEST, f"the body is not valid JSON: {e}") from None
    if not isinstance(body, dict):
        raise ApiError(http.BAD_REQUEST, "the body must be a JSON object")
    return body


class Api(resource.Resource):
    isLeaf = True

    def __init__(self, platform):
        super().__init__()
        self.platform = platform

    def render(self, request):
        if not self.platform.authorized("api", bearer_token(request)):
            request.setHeader(b"www-authenticate", b'Bearer realm="everest"')
            return _json(request, http.UNAUTHORIZED,
                         {"error": "an API token is required: Authorization: Bearer <token>"})
        try:
            segments = [s.decode("utf-8") for s in request.postpath]
        except UnicodeDecodeError:
            return _json(request, http.NOT_FOUND, {"error": "no such resource"})
        while segments and segments[-1] == "":
            segments.pop()
        method = request.method.decode("ascii", "replace")
        try:
            code, body = self._route(method, segments, request)
        except ApiError as e:
            code, body = e.code, {"error": e.message}
        return _json(request, code, body)

    def _route(self, method, segments, request):
        platform = self.platform
        if segments == ["tasks"]:
            if method == "GET":
                return http.OK, [task.summary() for task in platform.tasks.values()]
            if method == "POST":
                return self._submit(_body(request))
            raise ApiError(http.NOT_ALLOWED, f"{method} is not allowed on /api/tasks")
        if segments == ["agents"]:
            if method == "GET":
                return http.OK, [agent.summary() for agent in platform.agents.values()]
            raise ApiError(http.NOT_ALLOWED, f"{method} is not allowed on /api/agents")
        if len(segments) in (2, 3) and segments[0] == "tasks":
            task = platform.tasks.get(segments[1])
            if task is None:
                raise ApiError(http.NOT_FOUND, f"no task {segments[1]!r}")
            if len(segments) == 2:
                if method != "GET":
                    raise ApiError(http.NOT_ALLOWED, f"{method} is not allowed on a task")
                return http.OK, task.as_dict()
            action = segments[2]
            if action not in ("cancel", "message"):
                raise ApiError(http.NOT_FOUND, f"no action {action!r}")
            if method != "POST":
                raise ApiError(http.NOT_ALLOWED, f"use POST for {action}")
            if action == "cancel":
                canceled = platform.cancel(task.task_id)
                return http.OK, {"taskId": task.task_id, "canceled": canceled}
            text = _body(request).get("text")
            if not isinstance(text, str):
                raise ApiError(http.BAD_REQUEST, "'text' must be a string")
            platform.send_message(task.task_id, text)
            return http.OK, {"taskId": task.task_id}
        raise ApiError(http.NOT_FOUND, "no such resource")

    def _submit(self, body):
        spec = body.get("spec")
        if not isinstance(spec, dict):
            raise ApiError(http.BAD_REQUEST, "'spec' must be an object")
        task_id = body.get("taskId")
        agent = body.get("agent")
        if task_id is not None and not isinstance(task_id, str):
            raise ApiError(http.BAD_REQUEST, "'taskId' must be a string")
        if agent is not None and agent not in self.platform.agents:
            raise ApiError(http.BAD_REQUEST, f"no agent {str(agent)[:64]!r}")
        context = body.get("context")
        if context is not None and not isinstance(context, dict):
            raise ApiError(http.BAD_REQUEST, "'context' must be an object")
        try:
            task_id = self.platform.submit(spec, task_id=task_id, agent=agent, context=context)
        except ValueError as e:
            raise ApiError(http.BAD_REQUEST, str(e)) from None
        return http.CREATED, {"taskId": task_id}
