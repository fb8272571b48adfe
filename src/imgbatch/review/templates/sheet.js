(() => {
  "use strict";
  // The cards come from the data file beside the page (window.contactSheet); only the lines of
  // cards in view are in the document, so 100,000 shots draw as fast as 200. Every text from the
  // data is set as textContent, never as markup: prompts are user text.
  const $ = (id) => document.getElementById(id);
  const data = window.contactSheet;
  const grid = $("grid");
  if (!data) {
    $("stale").hidden = false;
    return;
  }
  if (data.page !== document.body.dataset.page) $("stale").hidden = false;
  // When the last apply finished is this machine's state: the page itself holds no run's time.
  if (data.finished_at) $("finished").textContent = `· last apply ${data.finished_at}`;

  const F = Object.create(null);
  data.fields.forEach((name, index) => { F[name] = index; });
  const INTERNED = new Set(["status", "change", "sent_label", "negative", "size", "model",
    "provider", "style", "error_code"]);
  // The first part of the cards is in the data file; the others load after it, one by one.
  const rows = data.rows;
  let count = rows.length;
  const total = data.total ?? count;
  function get(index, name) {
    const value = rows[index][F[name]];
    if (value === undefined || value === null) return null;
    return INTERNED.has(name) && typeof value === "number" ? data.strings[value] : value;
  }
  const idOf = rows.map((row) => row[F.id]);
  // A card whose image is <id>.png and whose thumbnail is where thumbnails go says 1 for them.
  function fileOf(index) {
    const file = get(index, "file");
    return file === 1 ? `${encodeURIComponent(idOf[index])}.png` : file;
  }
  function thumbOf(index) {
    const thumb = get(index, "thumb");
    if (thumb !== 1) return thumb;
    const key = get(index, "key");
    return data.thumbs.replace("{k2}", key.slice(0, 2)).replace("{key}", key);
  }
  const indexOf = new Map(idOf.map((id, index) => [id, index]));
  const haystacks = new Array(count);
  function haystack(index) {
    if (haystacks[index] === undefined) {
      haystacks[index] = [idOf[index], get(index, "prompt"), get(index, "sent"), get(index, "style")]
        .filter(Boolean).join("\n").toLowerCase();
    }
    return haystacks[index];
  }

  const search = $("search");
  const changedOnly = $("changed-only");
  const markedOnly = $("marked-only");
  const groupSelect = $("group");
  const viewButton = $("view");
  const shown = $("shown");
  const empty = $("empty");
  const filters = Array.from(document.querySelectorAll("[data-filter]"));
  const state = { status: "all", q: "", changed: false, marked: false, group: "", view: "dense" };
  const rerolls = new Set(); // ids as `imgbatch reroll` takes them (a shot's variants share one)
  const picks = new Map(); // the id a shot's takes share -> the take picked
  let current = -1;

  // ---- the URL keeps the view: a link shows the same shots, grouped the same, marks included
  function readHash() {
    const params = new URLSearchParams(location.hash.slice(1));
    state.status = params.get("status") || "all";
    state.q = params.get("q") || "";
    state.changed = params.get("changed") === "1";
    state.marked = params.get("marked") === "1";
    state.group = params.get("group") || "";
    state.view = params.get("view") === "cards" ? "cards" : "dense";
    rerolls.clear();
    picks.clear();
    for (const id of (params.get("reroll") || "").split(",").filter(Boolean)) rerolls.add(id);
    pendingPicks = (params.get("pick") || "").split(",").filter(Boolean);
    resolvePicks();
    return params.get("open");
  }

  let pendingPicks = [];
  function resolvePicks() {
    // A pick names a take that may be in a part not loaded yet: kept until it is.
    pendingPicks = pendingPicks.filter((id) => {
      const index = indexOf.get(id);
      if (index === undefined) return true;
      if (get(index, "base") && !get(index, "values")) picks.set(get(index, "base"), id);
      return false;
    });
  }

  function writeHash(open) {
    const params = new URLSearchParams();
    if (state.status !== "all") params.set("status", state.status);
    if (state.q) params.set("q", state.q);
    if (state.changed) params.set("changed", "1");
    if (state.marked) params.set("marked", "1");
    if (state.group) params.set("group", state.group);
    if (state.view !== "dense") params.set("view", state.view);
    if (rerolls.size) params.set("reroll", Array.from(rerolls).join(","));
    if (picks.size) params.set("pick", Array.from(picks.values()).join(","));
    if (open) params.set("open", open);
    const text = params.toString();
    history.replaceState(null, "", text ? `#${text}` : location.pathname + location.search);
  }

  function syncControls() {
    for (const button of filters) {
      button.setAttribute("aria-pressed", String(button.dataset.filter === state.status));
    }
    search.value = state.q;
    changedOnly.checked = state.changed && !changedOnly.disabled;
    markedOnly.checked = state.marked;
    if (!Array.from(groupSelect.options).some((option) => option.value === state.group)) {
      state.group = "";
    }
    groupSelect.value = state.group;
    document.body.dataset.view = state.view;
    viewButton.textContent = state.view === "dense" ? "Detailed cards" : "Dense grid";
  }

  // ---- which shots show, and how they are laid out
  function isMarked(index) {
    return rerolls.has(get(index, "reroll")) || picks.get(get(index, "base")) === idOf[index];
  }

  function visible() {
    const terms = state.q.toLowerCase().split(/\s+/).filter(Boolean);
    const result = [];
    for (let index = 0; index < count; index += 1) {
      if (state.status !== "all" && get(index, "status") !== state.status) continue;
      if (state.changed && !get(index, "change")) continue;
      if (state.marked && !isMarked(index)) continue;
      if (terms.length && !terms.every((term) => haystack(index).includes(term))) continue;
      result.push(index);
    }
    return result;
  }

  function groups(indices) {
    if (!state.group) return [{ label: null, members: indices }];
    const byKey = new Map();
    const variable = state.group.startsWith("var:") ? state.group.slice(4) : null;
    for (const index of indices) {
      let key;
      let label;
      if (variable) {
        const values = get(index, "values");
        const value = values && variable in values ? String(values[variable]) : null;
        key = value === null ? "\u0000" : value;
        label = value === null ? `no ${variable}` : `${variable} = ${value}`;
      } else {
        key = get(index, "base") || idOf[index];
        label = key;
      }
      if (!byKey.has(key)) byKey.set(key, { label, members: [] });
      byKey.get(key).members.push(index);
    }
    return Array.from(byKey.values());
  }

  const SIZES = { dense: { w: 150, h: 142 }, cards: { w: 300, h: 400 } };
  const HEAD = 40;
  const GAP = 10;
  let order = []; // the shown shots, in the order drawn
  let lines = []; // {head, count} or {tiles: [index...]}
  let tops = [];
  let lineOf = new Map(); // shot index -> [line, column]
  const drawn = new Map(); // line -> element

  function layout() {
    const size = SIZES[state.view];
    const width = grid.clientWidth || 800;
    const columns = Math.max(1, Math.floor((width + GAP) / (size.w + GAP)));
    grid.style.setProperty("--tile-w", `${(width - (columns - 1) * GAP) / columns}px`);
    grid.style.setProperty("--tile-h", `${size.h}px`);
    const indices = visible();
    order = [];
    lines = [];
    tops = [];
    lineOf = new Map();
    let y = 0;
    for (const group of groups(indices)) {
      if (group.label !== null) {
        lines.push({ head: group.label, count: group.members.length });
        tops.push(y);
        y += HEAD;
      }
      for (let start = 0; start < group.members.length; start += columns) {
        const tiles = group.members.slice(start, start + columns);
        tiles.forEach((index, column) => lineOf.set(index, [lines.length, column]));
        order.push(...tiles);
        lines.push({ tiles });
        tops.push(y);
        y += size.h + GAP;
      }
    }
    grid.style.height = `${y}px`;
    layoutCount();
    empty.hidden = indices.length > 0;
    for (const element of drawn.values()) element.remove();
    drawn.clear();
    draw();
  }

  function plural(n) {
    return `${n} shot${n === 1 ? "" : "s"}`;
  }

  function draw() {
    const top = -grid.getBoundingClientRect().top;
    const from = top - window.innerHeight;
    const to = top + 2 * window.innerHeight;
    let low = 0;
    let high = tops.length;
    while (low < high) {
      const middle = (low + high) >> 1;
      if (tops[middle] < from) low = middle + 1; else high = middle;
    }
    const wanted = new Set();
    for (let line = Math.max(0, low - 1); line < lines.length && tops[line] <= to; line += 1) {
      wanted.add(line);
      if (!drawn.has(line)) {
        const element = drawLine(line);
        drawn.set(line, element);
        grid.append(element);
      }
    }
    for (const [line, element] of drawn) {
      if (!wanted.has(line)) {
        element.remove();
        drawn.delete(line);
      }
    }
  }

  let pending = false;
  function redrawSoon() {
    if (pending) return;
    pending = true;
    requestAnimationFrame(() => {
      pending = false;
      draw();
    });
  }

  // ---- one line of tiles, one tile
  function make(tag, className, text) {
    const element = document.createElement(tag);
    if (className) element.className = className;
    if (text !== undefined && text !== null) element.textContent = String(text);
    return element;
  }

  function drawLine(line) {
    const spec = lines[line];
    const element = make("div", spec.head !== undefined ? "row head" : "row");
    element.style.top = `${tops[line]}px`;
    if (spec.head !== undefined) {
      element.append(make("h2", "group", spec.head), make("span", "n", plural(spec.count)));
      return element;
    }
    for (const index of spec.tiles) element.append(tile(index));
    return element;
  }

  function thumbImage(file, thumb, width, height, alt) {
    if (!thumb) {
      const blank = make("span", "blank");
      blank.append(make("span", "glyph", "▢"), make("span", "", "no preview"));
      return blank;
    }
    const image = make("img");
    image.src = thumb;
    image.loading = "lazy";
    image.decoding = "async";
    image.alt = alt;
    if (width) {
      image.width = width;
      image.height = height;
    }
    image.dataset.full = file;
    return image;
  }

  const BLANKS = {
    failed: ["✕", "no image: failed"],
    unfetched: ["↓", "billed, not downloaded yet: the next apply fetches it"],
    pending: ["…", "not generated yet"],
  };
  function blankFor(status) {
    const blank = make("span", "blank");
    const [glyph, text] = BLANKS[status] || ["?", "image missing"];
    blank.append(make("span", "glyph", glyph), make("span", "", text));
    return blank;
  }

  function seedText(index) {
    const seed = get(index, "seed");
    return seed === null ? "no seed" : `seed ${seed}`;
  }

  function tile(index) {
    const id = idOf[index];
    const status = get(index, "status");
    const element = make("div", `tile s-${status}`);
    element.id = `shot-${id}`;
    element.dataset.index = String(index);
    element.dataset.id = id;
    element.dataset.status = status;
    element.setAttribute("role", "option");
    element.setAttribute("aria-label", `${id}, ${status}`);
    if (get(index, "change")) element.classList.add("changed");
    if (index === current) element.classList.add("current");
    const media = make("div", "media");
    const file = fileOf(index);
    const previous = get(index, "prev_file");
    if (previous && state.view === "cards") {
      media.classList.add("pair");
      media.append(thumbImage(previous, get(index, "prev_thumb"), get(index, "prev_w"),
        get(index, "prev_h"), `${id} (before)`));
    }
    media.append(file
      ? thumbImage(file, thumbOf(index), get(index, "tw"), get(index, "th"), id)
      : blankFor(status));
    const badges = make("div", "badges");
    if (get(index, "change")) {
      const change = make("span", "badge change", get(index, "change"));
      change.title = get(index, "reason") || "";
      badges.append(change);
    }
    if (get(index, "provider") === "placeholder" && file) {
      const note = make("span", "badge placeholder", "placeholder");
      note.title = "An offline placeholder drawing, not a generated image";
      badges.append(note);
    }
    if (get(index, "picked")) badges.append(make("span", "badge picked", "picked"));
    if (rerolls.has(get(index, "reroll"))) badges.append(make("span", "badge reroll", "reroll"));
    if (picks.get(get(index, "base")) === id) badges.append(make("span", "badge pick", "pick"));
    media.append(badges);
    const actions = make("div", "acts");
    const reroll = make("button", "act", "R");
    reroll.type = "button";
    reroll.dataset.act = "reroll";
    reroll.title = "Mark for reroll (R)";
    actions.append(reroll);
    if (get(index, "base") && !get(index, "values")) {
      const pick = make("button", "act", "P");
      pick.type = "button";
      pick.dataset.act = "pick";
      pick.title = "Pick this take (P)";
      actions.append(pick);
    }
    media.append(actions);
    element.append(media);
    const caption = make("div", "cap");
    caption.append(make("span", `dot s-${status}`), make("span", "id", id));
    element.append(caption);
    if (state.view === "cards") element.append(details(index));
    if (isMarked(index)) element.classList.add("marked");
    return element;
  }

  function details(index) {
    const info = make("div", "info");
    const status = get(index, "status");
    info.append(make("span", `status s-${status}`, status));
    if (status === "failed" || status === "unfetched") {
      const error = make("p", "error");
      error.append(make("code", "code", get(index, "error_code") || "error"), " ",
        make("span", "message", get(index, "error_message") || "unknown error"));
      info.append(error);
    }
    if (get(index, "prompt") !== null) info.append(make("p", "prompt clamp", get(index, "prompt")));
    if (get(index, "negative")) {
      const negative = make("p", "line negative clamp");
      negative.append(make("span", "label", "neg"), make("span", "value", get(index, "negative")));
      info.append(negative);
    }
    if (get(index, "model")) {
      const meta = make("ul", "meta");
      for (const text of [get(index, "size"), seedText(index), get(index, "model")]) {
        meta.append(make("li", "", text));
      }
      info.append(meta);
    }
    return info;
  }

  // ---- moving around with the keyboard
  function setCurrent(index, scroll) {
    const before = document.querySelector(".tile.current");
    if (before) before.classList.remove("current");
    current = index;
    if (index < 0) return;
    if (scroll) {
      const place = lineOf.get(index);
      if (place) {
        const gridTop = grid.getBoundingClientRect().top + window.scrollY;
        const y = gridTop + tops[place[0]];
        const height = SIZES[state.view].h;
        const header = document.querySelector(".top").offsetHeight;
        if (y < window.scrollY + header) window.scrollTo(0, y - header - GAP);
        else if (y + height > window.scrollY + window.innerHeight) {
          window.scrollTo(0, y + height - window.innerHeight + GAP);
        }
        draw();
      }
    }
    const element = $(`shot-${idOf[index]}`);
    if (element) element.classList.add("current");
  }

  function move(key) {
    if (!order.length) return;
    const at = order.indexOf(current);
    if (at < 0) {
      setCurrent(order[0], true);
      return;
    }
    let next = current;
    if (key === "ArrowRight") next = order[Math.min(order.length - 1, at + 1)];
    else if (key === "ArrowLeft") next = order[Math.max(0, at - 1)];
    else if (key === "Home") next = order[0];
    else if (key === "End") next = order[order.length - 1];
    else {
      const [line, column] = lineOf.get(current);
      const step = key === "ArrowDown" ? 1 : -1;
      for (let other = line + step; other >= 0 && other < lines.length; other += step) {
        const tiles = lines[other].tiles;
        if (tiles) {
          next = tiles[Math.min(column, tiles.length - 1)];
          break;
        }
      }
    }
    setCurrent(next, true);
  }

  // ---- marks, and the commands they make
  const say = $("shown");
  function note(text) {
    say.textContent = text;
    clearTimeout(note.timer);
    note.timer = setTimeout(() => layoutCount(), 4000);
  }
  function layoutCount() {
    const matching = order.length;
    let text = matching === count ? plural(count) : `${matching} of ${plural(count)}`;
    if (count < total) text += ` (loading: ${count.toLocaleString("en")} of ${total.toLocaleString("en")})`;
    shown.textContent = text;
  }

  function toggleReroll(index) {
    const target = get(index, "reroll");
    if (!target) {
      note(`${idOf[index]}: ${get(index, "reroll_note") || "cannot be rerolled from here"}`);
      return;
    }
    if (rerolls.has(target)) rerolls.delete(target); else rerolls.add(target);
    marksChanged(index);
  }

  function togglePick(index) {
    const base = get(index, "base");
    if (!base || get(index, "values")) {
      note(`${idOf[index]} is not a take of a shot with variants: nothing to pick`);
      return;
    }
    if (picks.get(base) === idOf[index]) picks.delete(base); else picks.set(base, idOf[index]);
    marksChanged(index);
  }

  function marksChanged(index) {
    if (state.marked) layout();
    else {
      for (const element of drawn.values()) element.remove();
      drawn.clear();
      draw();
    }
    setCurrent(index, false);
    updateCommands();
    if (viewer.open && index >= 0) showDetails(index);
    writeHash(viewer.open ? idOf[index] : null);
  }

  function quote(word) {
    return /^[A-Za-z0-9._\/=:@%+-]+$/.test(word) ? word : `'${word.replace(/'/g, "'\\''")}'`;
  }

  function commandText() {
    const manifest = quote(data.manifest || "shots.yaml");
    const lines = [];
    const rerollIds = Array.from(rerolls).sort((a, b) => (indexOf.get(a) ?? 0) - (indexOf.get(b) ?? 0));
    if (rerollIds.length) lines.push(`imgbatch reroll ${manifest} ${rerollIds.map(quote).join(" ")}`);
    const pickIds = Array.from(picks.values());
    if (pickIds.length) lines.push(`imgbatch pick ${manifest} ${pickIds.map(quote).join(" ")}`);
    return lines.join("\n");
  }

  const panel = $("commands");
  const command = $("command");
  const download = $("download");
  let downloadUrl = null;
  function updateCommands() {
    const text = commandText();
    const marked = rerolls.size + picks.size;
    $("marked-count").textContent = String(marked);
    panel.hidden = !text;
    document.body.classList.toggle("with-commands", Boolean(text));
    command.textContent = text;
    const parts = [];
    if (rerolls.size) parts.push(`${rerolls.size} to reroll`);
    if (picks.size) parts.push(`${picks.size} picked`);
    $("mark-summary").textContent = parts.join(", ");
    $("apply-hint").textContent = `imgbatch apply ${quote(data.manifest || "shots.yaml")}`;
    if (downloadUrl) URL.revokeObjectURL(downloadUrl);
    const script = `#!/bin/sh\n# Review decisions from the contact sheet of ${data.title}.\nset -e\n${text}\n`;
    downloadUrl = URL.createObjectURL(new Blob([script], { type: "text/x-shellscript" }));
    download.href = downloadUrl;
  }

  $("copy").addEventListener("click", () => {
    const text = commandText();
    const done = () => {
      $("copy").textContent = "Copied";
      setTimeout(() => { $("copy").textContent = "Copy command"; }, 1500);
    };
    const fallback = () => {
      const range = document.createRange();
      range.selectNodeContents(command);
      const selection = getSelection();
      selection.removeAllRanges();
      selection.addRange(range);
      if (document.execCommand("copy")) done();
    };
    if (navigator.clipboard) navigator.clipboard.writeText(text).then(done, fallback);
    else fallback();
  });
  $("clear-marks").addEventListener("click", () => {
    rerolls.clear();
    picks.clear();
    marksChanged(current);
  });

  // ---- the viewer: the full image beside what was asked and what happened
  const viewer = $("viewer");
  const stage = viewer.querySelector(".stage");
  const before = $("v-before");
  const after = $("v-after");
  const slider = $("v-slider");
  const modes = Array.from(viewer.querySelectorAll(".modes [data-mode]"));

  function setMode(mode) {
    stage.dataset.mode = mode;
    for (const button of modes) {
      button.setAttribute("aria-pressed", String(button.dataset.mode === mode));
    }
  }

  function detail(list, term, value, className) {
    if (value === null || value === undefined || value === "") return;
    list.append(make("dt", "", term));
    list.append(make("dd", className || "", value));
  }

  function showDetails(index) {
    const list = $("v-details");
    list.replaceChildren();
    const status = get(index, "status");
    detail(list, "status", status, `status s-${status}`);
    if (status === "failed" || status === "unfetched") {
      detail(list, "error", `${get(index, "error_code") || "error"}: ${get(index, "error_message") || "unknown error"}`, "error");
    }
    detail(list, "prompt", get(index, "prompt"), "prompt");
    if (get(index, "sent")) detail(list, get(index, "sent_label") || "sent", get(index, "sent"));
    detail(list, "negative", get(index, "negative"));
    detail(list, "size", get(index, "size"));
    if (get(index, "model")) {
      detail(list, "seed", get(index, "seed") === null
        ? "no seed: the service chose one" : String(get(index, "seed")));
    }
    detail(list, "model", get(index, "model"));
    detail(list, "style", get(index, "style"));
    if (get(index, "provider") === "placeholder") {
      detail(list, "provider", "placeholder: an offline drawing, not a generated image", "placeholder");
    } else detail(list, "provider", get(index, "provider"));
    if (get(index, "base")) {
      const values = get(index, "values");
      detail(list, "take", `${get(index, "variant")} of ${get(index, "base")}${get(index, "picked") ? " (picked)" : ""}`);
      if (values) detail(list, "matrix", Object.entries(values).map(([k, v]) => `${k} = ${v}`).join(", "));
    } else if (get(index, "values")) {
      detail(list, "matrix", Object.entries(get(index, "values")).map(([k, v]) => `${k} = ${v}`).join(", "));
    }
    if (get(index, "change")) detail(list, "last run", `${get(index, "change")}: ${get(index, "reason")}`);
    detail(list, "previous prompt", get(index, "prev_prompt"));
    detail(list, "request id", get(index, "request_id"));
    detail(list, "attempts", get(index, "attempts"));
    detail(list, "key", get(index, "key"), "key");
    detail(list, "reroll", get(index, "reroll_note"));
    const marked = rerolls.has(get(index, "reroll"));
    $("v-reroll").setAttribute("aria-pressed", String(marked));
    $("v-reroll").disabled = !get(index, "reroll");
    $("v-pick").hidden = !get(index, "base") || Boolean(get(index, "values"));
    $("v-pick").setAttribute("aria-pressed", String(picks.get(get(index, "base")) === idOf[index]));
  }

  function open(index) {
    setCurrent(index, true);
    const id = idOf[index];
    $("v-title").textContent = id;
    $("v-note").textContent = get(index, "change")
      ? `${get(index, "change")}: ${get(index, "reason")}` : "";
    const file = fileOf(index);
    const previous = get(index, "prev_file");
    const none = $("v-none");
    none.hidden = Boolean(file);
    if (!file) {
      none.textContent = (BLANKS[get(index, "status")] || ["?", "image missing"])[1];
      before.removeAttribute("src");
      after.removeAttribute("src");
      $("v-open").hidden = true;
      setMode("none");
    } else if (previous) {
      $("v-open").hidden = false;
      before.src = previous;
      after.src = file;
      $("v-open").href = file;
      stage.classList.add("show-after");
      setMode(["side", "slider", "toggle"].includes(stage.dataset.mode) ? stage.dataset.mode : "side");
    } else {
      $("v-open").hidden = false;
      before.removeAttribute("src");
      after.src = file;
      $("v-open").href = file;
      setMode("single");
    }
    showDetails(index);
    if (!viewer.open) viewer.showModal();
    writeHash(id);
  }

  function step(direction) {
    const at = order.indexOf(current);
    const next = order[at + direction];
    if (next !== undefined) open(next);
  }

  for (const button of modes) button.addEventListener("click", () => setMode(button.dataset.mode));
  slider.addEventListener("input", () => stage.style.setProperty("--split", slider.value));
  stage.addEventListener("click", () => {
    if (stage.dataset.mode === "toggle") stage.classList.toggle("show-after");
  });
  $("v-close").addEventListener("click", () => viewer.close());
  $("v-reroll").addEventListener("click", () => toggleReroll(current));
  $("v-pick").addEventListener("click", () => togglePick(current));
  viewer.addEventListener("click", (event) => {
    if (event.target === viewer) viewer.close();
  });
  viewer.addEventListener("close", () => {
    before.removeAttribute("src");
    after.removeAttribute("src");
    writeHash(null);
    // Back to the grid, unless the user has already gone elsewhere (the close event comes
    // after the key that closed it: a search typed at once keeps its focus).
    const focused = document.activeElement;
    if (!focused || focused === document.body || viewer.contains(focused)) {
      grid.focus({ preventScroll: true });
    }
  });

  // ---- events
  grid.addEventListener("click", (event) => {
    const element = event.target.closest(".tile");
    if (!element) return;
    const index = Number(element.dataset.index);
    const act = event.target.closest("[data-act]");
    if (act) {
      if (act.dataset.act === "reroll") toggleReroll(index); else togglePick(index);
      return;
    }
    const clamp = event.target.closest(".clamp");
    if (clamp) {
      clamp.classList.toggle("open");
      return;
    }
    open(index);
  });

  for (const button of filters) {
    button.addEventListener("click", () => {
      state.status = button.dataset.filter;
      changed();
    });
  }
  function changed() {
    syncControls();
    layout();
    writeHash(null);
  }
  search.addEventListener("input", () => {
    state.q = search.value;
    layout();
    writeHash(null);
  });
  changedOnly.addEventListener("change", () => { state.changed = changedOnly.checked; changed(); });
  markedOnly.addEventListener("change", () => { state.marked = markedOnly.checked; changed(); });
  groupSelect.addEventListener("change", () => { state.group = groupSelect.value; changed(); });
  viewButton.addEventListener("click", () => {
    state.view = state.view === "dense" ? "cards" : "dense";
    changed();
  });
  window.addEventListener("scroll", redrawSoon, { passive: true });
  window.addEventListener("resize", () => layout());

  document.addEventListener("keydown", (event) => {
    if (event.ctrlKey || event.metaKey || event.altKey) return;
    const key = event.key;
    if (viewer.open) {
      if (key === "ArrowRight") step(1);
      else if (key === "ArrowLeft") step(-1);
      else if (key === "r" || key === "R") toggleReroll(current);
      else if (key === "p" || key === "P") togglePick(current);
      else if ((key === "t" || key === "T") && ["side", "slider", "toggle"].includes(stage.dataset.mode)) {
        setMode("toggle");
        stage.classList.toggle("show-after");
      } else return;
      event.preventDefault();
      return;
    }
    if (document.activeElement === search) {
      if (key === "Escape") {
        search.value = "";
        state.q = "";
        layout();
        writeHash(null);
      } else if (key === "Enter" || key === "ArrowDown") {
        search.blur();
        grid.focus();
        setCurrent(order[0] ?? -1, true);
      }
      return;
    }
    if (["INPUT", "SELECT", "TEXTAREA"].includes(document.activeElement.tagName)) return;
    if (key === "/") search.focus();
    else if (["ArrowRight", "ArrowLeft", "ArrowUp", "ArrowDown", "Home", "End"].includes(key)) move(key);
    else if ((key === "Enter" || key === " ") && current >= 0) open(current);
    else if ((key === "r" || key === "R") && current >= 0) toggleReroll(current);
    else if ((key === "p" || key === "P") && current >= 0) togglePick(current);
    else if (key === "v" || key === "V") {
      state.view = state.view === "dense" ? "cards" : "dense";
      changed();
    } else return;
    event.preventDefault();
  });

  // ---- the other parts of the data, loaded one after another once the first cards are drawn
  const source = document.querySelector("script[src]").getAttribute("src");
  let parts = 1;
  let relayout = false;
  let pendingOpen = null;
  window.contactSheetPart = (number, part) => {
    if (number !== parts || part.page !== data.page) {
      $("stale").hidden = false;
      return;
    }
    for (const row of part.rows) {
      indexOf.set(row[F.id], rows.length);
      idOf.push(row[F.id]);
      rows.push(row);
    }
    count = rows.length;
    parts += 1;
    resolvePicks();
    updateCommands();
    if (!relayout) {
      relayout = true;
      requestAnimationFrame(() => {
        relayout = false;
        layout();
        setCurrent(current, false);
        if (pendingOpen && indexOf.has(pendingOpen)) {
          open(indexOf.get(pendingOpen));
          pendingOpen = null;
        }
      });
    }
    loadPart();
  };
  function loadPart() {
    if (parts >= (data.parts ?? 1)) return;
    const script = document.createElement("script");
    script.src = source.replace(/\.js$/, `-${parts}.js`);
    script.onerror = () => { $("stale").hidden = false; };
    document.body.append(script);
  }

  const opened = readHash();
  syncControls();
  layout();
  updateCommands();
  performance.mark("imgbatch-first-cards"); // what bench/sheet.py measures
  if (opened && indexOf.has(opened)) open(indexOf.get(opened));
  else if (opened) pendingOpen = opened;
  // After the first cards are on the screen.
  requestAnimationFrame(() => setTimeout(loadPart, 0));
})();
