// The status page: polls api/status and redraws. Read-only: it only ever sends GETs.
// Every value is written with textContent (never as HTML), so names cannot inject markup.
'use strict';

const POLL_MS = 3000;
const SVG = 'http://www.w3.org/2000/svg';

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs || {})) {
    if (value === undefined || value === null || value === false) continue;
    if (key === 'class') node.className = value;
    else node.setAttribute(key, String(value));
  }
  for (const child of children) {
    if (child === undefined || child === null) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

function td(value, cls) { return el('td', { class: cls }, value); }

function pill(text, cls) { return el('span', { class: 'pill ' + cls }, text); }

function fill(tbody, rows, columns, emptyText) {
  tbody.replaceChildren(...rows);
  if (rows.length === 0) {
    tbody.append(el('tr', { class: 'empty' }, el('td', { colspan: columns }, emptyText)));
  }
}

function rate(value) {
  if (!value) return '0/s';
  return (value >= 100 ? value.toFixed(0) : value >= 10 ? value.toFixed(1) : value.toFixed(2)) + '/s';
}

function percent(ratio) {
  if (!ratio) return '0%';
  return (ratio * 100).toFixed(ratio < 0.1 ? 1 : 0) + '%';
}

function last(values) { return values && values.length ? values[values.length - 1] : 0; }

function duration(seconds) {
  const d = Math.floor(seconds / 86400), h = Math.floor(seconds % 86400 / 3600);
  const m = Math.floor(seconds % 3600 / 60), s = Math.floor(seconds % 60);
  if (d) return d + 'd ' + h + 'h';
  if (h) return h + 'h ' + m + 'm';
  if (m) return m + 'm ' + s + 's';
  return s + 's';
}

function date(unixMs) {
  if (!unixMs) return 'never';
  return new Date(unixMs).toISOString().replace('T', ' ').replace(/\.\d+Z$/, ' UTC');
}

function ago(unixMs, nowMs) {
  if (!unixMs) return 'never';
  return duration(Math.max(0, (nowMs - unixMs) / 1000)) + ' ago';
}

// A sparkline: the series scaled to its own maximum (at least `floor`), newest on the right.
function spark(values, opts) {
  const width = (opts && opts.width) || 140, height = (opts && opts.height) || 26;
  const box = el('div', { class: 'spark' + (opts && opts.error ? ' error' : '') });
  const svg = document.createElementNS(SVG, 'svg');
  svg.setAttribute('width', width);
  svg.setAttribute('height', height);
  svg.setAttribute('viewBox', '0 0 ' + width + ' ' + height);
  svg.setAttribute('role', 'img');
  const series = values && values.length ? values : [0];
  const max = Math.max((opts && opts.floor) || 1, ...series);
  const step = series.length > 1 ? (width - 4) / (series.length - 1) : 0;
  const points = series.map((v, i) => [2 + i * step, height - 2 - (v / max) * (height - 4)]);
  const line = points.map(p => p[0].toFixed(1) + ',' + p[1].toFixed(1)).join(' ');
  const area = document.createElementNS(SVG, 'polygon');
  area.setAttribute('class', 'area');
  area.setAttribute('points', '2,' + (height - 2) + ' ' + line + ' ' + (2 + (series.length - 1) * step).toFixed(1) + ',' + (height - 2));
  const polyline = document.createElementNS(SVG, 'polyline');
  polyline.setAttribute('points', line);
  const dot = document.createElementNS(SVG, 'circle');
  const end = points[points.length - 1];
  dot.setAttribute('cx', end[0]);
  dot.setAttribute('cy', end[1]);
  dot.setAttribute('r', 2);
  const title = document.createElementNS(SVG, 'title');
  title.textContent = 'last ' + series.length + ' samples, max ' + max.toFixed(2);
  svg.append(title, area, polyline, dot);
  box.append(svg);
  return box;
}

function healthClass(health) {
  return health === 'healthy' || health === 'up' ? 'ok' : 'error';
}

function renderDaemon(doc) {
  const d = doc.daemon;
  const facts = [
    ['version', d.version], ['pid', d.pid], ['uptime', duration(d.uptime_seconds)],
    ['revision', d.revision], ['state', d.draining ? 'draining' : 'serving'],
  ];
  document.getElementById('daemon').replaceChildren(
    ...facts.map(([k, v]) => el('div', { 'data-fact': k }, el('dt', null, k), el('dd', null, v))));
  document.body.dataset.revision = d.revision;
}

function renderProblems(doc) {
  const list = document.getElementById('problems');
  if (doc.problems.length === 0) {
    list.replaceChildren(el('li', { class: 'ok' }, 'No problems: every pool has a working upstream, certificates are valid for more than 14 days, discovery sources answer.'));
    return;
  }
  list.replaceChildren(...doc.problems.map(p => el('li',
    { class: p.severity, 'data-kind': p.kind, 'data-subject': p.subject },
    el('span', { class: 'subject' }, p.kind + ' ' + p.subject), p.message)));
}

function renderCards(doc) {
  const r = doc.rates;
  document.getElementById('total-rps').textContent = rate(last(r.requests_per_s));
  document.getElementById('total-rps-spark').replaceChildren(spark(r.requests_per_s, { width: 220, height: 34 }));
  const conns = doc.listeners.reduce((sum, l) => sum + l.connections, 0);
  document.getElementById('total-conns').textContent = conns;
  document.getElementById('total-conns-spark').replaceChildren(spark(r.connections, { width: 220, height: 34 }));
  const upstreams = doc.pools.reduce((n, p) => n + p.upstreams.length, 0);
  const available = doc.pools.reduce((n, p) => n + p.available, 0);
  const upNode = document.getElementById('upstreams-up');
  upNode.textContent = available + ' / ' + upstreams;
  upNode.className = 'big' + (available < upstreams ? ' bad-text' : '');
  const downPools = doc.pools.filter(p => p.available === 0 && !(p.source === 'registration' && p.upstreams.length === 0)).length;
  document.getElementById('pools-summary').textContent =
    doc.pools.length + ' pools' + (downPools ? ', ' + downPools + ' with none available' : '');
  document.getElementById('certs-count').textContent = doc.certificates.length;
  const soon = doc.certificates.filter(c => c.days_left < 14).length;
  document.getElementById('certs-summary').textContent =
    soon ? soon + ' expiring within 14 days' : 'none expiring within 14 days';
}

function renderListeners(doc) {
  fill(document.querySelector('#listeners tbody'), doc.listeners.map(l =>
    el('tr', { 'data-listener': l.name },
      td(l.name), td(l.protocol), td(el('code', null, l.address)), td(l.connections, 'num'))),
  4, 'no listeners');
}

function renderRoutes(doc) {
  const rows = doc.routes.map(r => {
    const errorNow = last(r.error_ratio);
    // A held route waits for its service on purpose: a warning, not an error.
    const cls = r.held ? 'warning' : r.pool_down ? 'error' : errorNow > 0.05 ? 'warning' : null;
    return el('tr', { class: cls, 'data-route': r.name, 'data-source': r.source, 'data-pool-down': r.pool_down ? 'true' : 'false', 'data-held': r.held ? 'true' : 'false' },
      td(r.name), td(r.listener), td(r.host || '*'),
      td(el('code', null, r.path_match === 'exact' ? r.path + ' (exact)' : r.path)),
      td(r.pool), td(pill(r.source, 'neutral')),
      td(rate(last(r.requests_per_s)), 'num'),
      td(spark(r.requests_per_s)),
      td(percent(errorNow), 'num' + (errorNow > 0 ? ' bad' : '')),
      td(r.requests, 'num'));
  });
  fill(document.querySelector('#routes tbody'), rows, 10, 'no HTTP routes');
  const tcp = document.getElementById('tcp-routes');
  tcp.classList.toggle('hidden', doc.tcp_routes.length === 0);
  fill(tcp.querySelector('tbody'), doc.tcp_routes.map(r =>
    el('tr', { 'data-tcp-route': r.name },
      td(r.name), td(r.listener), td(r.sni || '*'), td(r.pool), td(pill(r.source, 'neutral')))),
  5, 'no TCP routes');
}

function renderPools(doc) {
  const blocks = doc.pools.map(p => {
    // A registration's pool with no instance belongs to a held route: waiting, not broken.
    const held = p.source === 'registration' && p.upstreams.length === 0;
    const down = p.available === 0 && !held;
    const header = el('h4', null, p.name,
      held ? pill('held: no instance', 'warning')
        : pill(p.available + '/' + p.upstreams.length + ' available', down ? 'error' : p.available < p.upstreams.length ? 'warning' : 'ok'),
      el('span', { class: 'muted' }, p.source + ' · ' + p.balance + ' · ' + (p.health_check ? 'check: ' + p.health_check : 'no active check')));
    const rows = p.upstreams.map(u => el('tr',
      { class: healthClass(u.health) === 'error' ? 'error' : u.state === 'draining' ? 'warning' : null,
        'data-upstream': u.address, 'data-health': u.health, 'data-state': u.state },
      td(el('code', null, u.address)), td(u.origin), td(pill(u.state, u.state === 'active' ? 'ok' : 'warning')),
      td(pill(u.health, healthClass(u.health))), td(u.in_flight, 'num'), td(u.weight, 'num')));
    const table = el('table', null,
      el('thead', null, el('tr', null, el('th', null, 'Upstream'), el('th', null, 'Origin'), el('th', null, 'State'),
        el('th', null, 'Health'), el('th', { class: 'num' }, 'In flight'), el('th', { class: 'num' }, 'Weight'))),
      el('tbody'));
    fill(table.querySelector('tbody'), rows, 6, 'no upstreams');
    return el('div', { class: 'pool' + (down ? ' error' : held ? ' warning' : ''), 'data-pool': p.name, 'data-available': p.available }, header, table);
  });
  const box = document.getElementById('pools');
  box.replaceChildren(...blocks);
  if (blocks.length === 0) box.append(el('p', { class: 'muted' }, 'no pools'));
}

function renderCertificates(doc) {
  fill(document.querySelector('#certificates tbody'), doc.certificates.map(c => {
    const cls = c.days_left < 0 ? 'error' : c.days_left < 14 ? 'warning' : null;
    return el('tr', { class: cls, 'data-certificate': c.name, 'data-days-left': c.days_left },
      td(c.name), td(c.names.join(', ')), td(pill(c.source, 'neutral')), td(c.issuer),
      td(date(c.not_after * 1000)),
      td(c.days_left < 0 ? 'expired' : c.days_left, 'num'));
  }), 6, 'no certificates');
}

function renderDiscovery(doc) {
  fill(document.querySelector('#discovery tbody'), doc.discovery.map(s =>
    el('tr', { class: s.ok ? null : 'error', 'data-source-pool': s.pool, 'data-ok': s.ok ? 'true' : 'false' },
      td(s.pool), td(s.kind), td(el('code', null, s.target)), td(s.members, 'num'),
      td(s.ok ? pill('ok', 'ok') : el('span', null, pill('failing', 'error'), ' ', s.last_error)),
      td(ago(s.last_success_unix_ms, doc.daemon.now_unix_ms)))),
  6, 'no discovery sources');
}

function renderRegistrations(doc) {
  const now = doc.daemon.now_unix_ms;
  fill(document.querySelector('#registrations tbody'), doc.registrations.map(r =>
    el('tr', { 'data-registration': r.id },
      td(r.id, 'num'), td(r.name || '–'), td(r.route), td(r.listener + ' (' + r.address + ')'),
      td(el('code', null, r.endpoint)), td(r.tls ? 'yes' : 'no'), td(ago(r.since_unix_ms, now)))),
  7, 'no registrations');
  fill(document.querySelector('#registered-routes tbody'), doc.registered_routes.map(r => {
    const held = r.held_until_unix_ms > 0;
    return el('tr', { class: held ? 'warning' : null, 'data-registered-route': r.route, 'data-held': held ? 'true' : 'false' },
      td(r.route), td(r.listener), td(r.instances, 'num'),
      td(held ? pill('held for ' + duration(Math.max(0, (r.held_until_unix_ms - now) / 1000)), 'warning') : pill('live', 'ok')),
      td(r.waiting, 'num'));
  }), 5, 'no registered routes');
}

function render(doc) {
  renderDaemon(doc);
  renderProblems(doc);
  renderCards(doc);
  renderListeners(doc);
  renderRoutes(doc);
  renderPools(doc);
  renderCertificates(doc);
  renderDiscovery(doc);
  renderRegistrations(doc);
  const polls = Number(document.body.dataset.polls || 0) + 1;
  document.body.dataset.polls = polls;
  document.body.dataset.loaded = '1';
}

async function poll() {
  const badge = document.getElementById('connection');
  try {
    const response = await fetch('api/status', { cache: 'no-store', credentials: 'same-origin' });
    if (!response.ok) throw new Error('HTTP ' + response.status);
    render(await response.json());
    badge.textContent = 'live · ' + new Date().toLocaleTimeString();
    badge.className = 'badge live';
  } catch (error) {
    badge.textContent = 'unreachable: ' + error.message;
    badge.className = 'badge lost';
  }
  setTimeout(poll, POLL_MS);
}

poll();
