// Server-Sent Events read from text that arrives in pieces, as an XMLHttpRequest's responseText
// grows. EventSource would parse them for us, but it can only GET, and an upload must be POSTed.
// The rules are the HTML standard's (section "Parsing an event stream"), minus reconnection,
// which a POST cannot do: so "id" and "retry" are ignored like any unknown field.

// A piece may end anywhere: inside a line, or between the CR and LF of one line break.
export class EventStreamParser {
  // onEvent(type, data) for each complete event; type is "message" when the event names none.
  constructor(onEvent) {
    this.onEvent = onEvent;
    this.partialLine = "";
    this.afterCarriageReturn = false; // the last piece ended with CR: a leading LF belongs to it
    this.atStart = true;
    this.type = "";
    this.dataLines = [];
  }

  push(text) {
    if (text === "") return;
    let start = 0;
    if (this.atStart) {
      this.atStart = false;
      if (text.startsWith("\uFEFF")) start = 1;
    }
    if (this.afterCarriageReturn && text.startsWith("\n", start)) start += 1;
    this.afterCarriageReturn = false;
    // Only the new piece is searched, never the partial line before it: a result event's data
    // (a whole PNG in base64) may arrive in thousands of pieces.
    const lineBreak = /\r\n|\r|\n/g;
    lineBreak.lastIndex = start;
    let found;
    while ((found = lineBreak.exec(text)) !== null) {
      const line = this.partialLine + text.slice(start, found.index);
      this.partialLine = "";
      start = lineBreak.lastIndex;
      if (found[0] === "\r" && start === text.length) this.afterCarriageReturn = true;
      this.readLine(line);
    }
    this.partialLine += text.slice(start);
  }

  readLine(line) {
    if (line === "") {
      this.dispatch();
      return;
    }
    if (line.startsWith(":")) return; // a comment, such as the service's keep-alives
    const colon = line.indexOf(":");
    const field = colon === -1 ? line : line.slice(0, colon);
    let value = colon === -1 ? "" : line.slice(colon + 1);
    if (value.startsWith(" ")) value = value.slice(1);
    if (field === "event") this.type = value;
    else if (field === "data") this.dataLines.push(value);
  }

  dispatch() {
    const { type, dataLines } = this;
    this.type = "";
    this.dataLines = [];
    // An event without data lines is no event, as in EventSource.
    if (dataLines.length > 0) this.onEvent(type || "message", dataLines.join("\n"));
  }
}
