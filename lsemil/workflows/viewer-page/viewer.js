// The page of `lsemil serve` (lsemil/workflows/viewing.py): uploads each chosen or dropped file
// to POST /api/predict (raw bytes, the name in X-File-Name), one after the other, and shows the
// findings sorted by probability, the chosen class's saliency overlay with its colour scale and
// boxes, and a download of the JSON. Text goes through textContent only, never innerHTML.
'use strict';
(function () {
  const SVG = 'http://www.w3.org/2000/svg';
  const queue = [];
  let info = null;
  let busy = false;

  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (k === 'text') node.textContent = v;
      else if (k === 'class') node.className = v;
      else node.setAttribute(k, v);
    }
    for (const c of children) if (c) node.appendChild(c);
    return node;
  }

  async function loadInfo() {
    try {
      const r = await fetch('/api/info');
      info = await r.json();
    } catch (e) {
      document.getElementById('model').textContent = 'the server does not answer: ' + e.message;
      return;
    }
    const ops = info.operating_points;
    let text = info.checkpoint + ' (step ' + info.step + '), ' + info.classes.length +
      ' findings; decisions: ' + (ops ? ops.rule + ' thresholds' : 'none stored');
    if (info.calibration) text += '; calibrated: ' + info.calibration;
    document.getElementById('model').textContent = text;
    document.getElementById('tab-report').hidden = !info.browse;
  }

  function addFiles(files) {
    const batch = document.createDocumentFragment();  // the newest files on top, in order
    for (const file of files) {
      const card = el('div', {class: 'card', 'data-state': 'queued'},
        el('h2', {text: file.name}), el('p', {class: 'status', text: 'waiting...'}));
      batch.appendChild(card);
      queue.push([file, card]);
    }
    document.getElementById('results').prepend(batch);
    pump();
  }

  async function pump() {
    if (busy) return;
    busy = true;
    await ready;
    while (queue.length) {
      const [file, card] = queue.shift();
      await predict(file, card);
    }
    busy = false;
  }

  function fail(card, message) {
    card.dataset.state = 'error';
    card.querySelector('.status').replaceWith(el('p', {class: 'error', text: message}));
  }

  async function predict(file, card) {
    card.dataset.state = 'busy';
    card.querySelector('.status').textContent = 'predicting...';
    let r, body;
    try {
      r = await fetch('/api/predict', {
        method: 'POST', body: file,
        headers: {'X-File-Name': encodeURIComponent(file.name),
                  'Content-Type': 'application/octet-stream'},
      });
      body = await r.json();
    } catch (e) {
      return fail(card, file.name + ': no answer from the server (' + e.message + ')');
    }
    if (!r.ok || body.error) return fail(card, body.error || file.name + ': HTTP ' + r.status);
    show(card, body.result, body.view);
    card.dataset.state = 'done';
  }

  function figure(result, view) {
    const size = result.image_size;
    const stack = el('div', {class: 'stack'});
    stack.style.aspectRatio = size.width + ' / ' + size.height;
    const map = el('img', {class: 'map', alt: 'saliency'});
    stack.append(el('img', {class: 'xray', alt: result.file, src: view.image}), map);
    const svg = document.createElementNS(SVG, 'svg');
    svg.setAttribute('viewBox', '0 0 ' + size.width + ' ' + size.height);
    svg.setAttribute('preserveAspectRatio', 'none');
    stack.appendChild(svg);
    const caption = el('span', {class: 'caption'});
    const scale = el('div', {class: 'scale'}, caption,
      el('img', {src: info.colour_scale, alt: 'colour scale from 0 to 1'}),
      el('div', {class: 'ticks'}, el('span', {text: '0'}), el('span', {text: '0.5'}),
        el('span', {text: '1'})));
    const showMap = el('input', {type: 'checkbox', checked: ''});
    const showBoxes = el('input', {type: 'checkbox', checked: ''});
    const controls = el('div', {class: 'controls'},
      el('label', {}, showMap, document.createTextNode(' saliency')),
      el('label', {}, showBoxes, document.createTextNode(' boxes (S >= ' + result.box_tau + ')')));
    showMap.addEventListener('change', () => { map.hidden = !showMap.checked; });
    showBoxes.addEventListener('change', () => { svg.style.display = showBoxes.checked ? '' : 'none'; });
    const select = function (cls) {
      map.src = view.overlays[cls];
      caption.textContent = 'saliency S of ' + cls;
      while (svg.firstChild) svg.removeChild(svg.firstChild);
      for (const b of result.boxes[cls] || []) {
        const rect = document.createElementNS(SVG, 'rect');
        for (const k of ['x', 'y']) rect.setAttribute(k, b[k]);
        rect.setAttribute('width', b.w);
        rect.setAttribute('height', b.h);
        const title = document.createElementNS(SVG, 'title');
        title.textContent = cls + ': peak ' + b.peak.toFixed(3) + ', mean ' + b.mean.toFixed(3);
        rect.appendChild(title);
        svg.appendChild(rect);
      }
    };
    return [el('div', {class: 'figure'}, stack, scale, controls), select];
  }

  function decisionCell(f) {
    if (f.decision === null) return el('td', {text: '\u2014', title: 'no operating point'});
    return el('td', {class: f.decision ? 'positive' : 'negative',
      text: f.decision ? 'positive' : 'negative', title: 'p >= ' + f.threshold});
  }

  function table(result, select) {
    const calibrated = result.findings.some((f) => f.calibrated !== null);
    const head = el('tr', {}, el('th', {text: 'finding'}), el('th', {text: 'probability'}),
      calibrated ? el('th', {text: 'calibrated'}) : null, el('th', {text: 'decision'}));
    const body = el('tbody');
    const sorted = result.findings.slice().sort((a, b) => b.probability - a.probability);
    for (const f of sorted) {
      const row = el('tr', {'data-class': f['class']}, el('td', {text: f['class']}),
        el('td', {class: 'num p', text: f.probability.toFixed(3)}),
        calibrated ? el('td', {class: 'num', text: f.calibrated.toFixed(3)}) : null,
        decisionCell(f));
      row.addEventListener('click', () => {
        for (const other of body.children) other.classList.remove('selected');
        row.classList.add('selected');
        select(f['class']);
      });
      body.appendChild(row);
    }
    return el('table', {class: 'findings'}, el('thead', {}, head), body);
  }

  function show(card, result, view) {
    const [fig, select] = figure(result, view);
    const findings = table(result, select);
    const blob = new Blob([JSON.stringify(result, null, 1)], {type: 'application/json'});
    const link = el('a', {class: 'download', href: URL.createObjectURL(blob),
      download: result.file.replace(/\.[^.]*$/, '') + '.lsemil.json', text: 'Download JSON'});
    card.querySelector('.status').replaceWith(
      el('div', {class: 'body'}, fig, el('div', {}, findings, link)));
    findings.querySelector('tbody tr').click();  // the most probable finding first
  }

  function tabs() {
    const pages = {predict: 'tab-predict', report: 'tab-report'};
    for (const [page, id] of Object.entries(pages)) {
      document.getElementById(id).addEventListener('click', () => {
        for (const [other, otherId] of Object.entries(pages)) {
          document.getElementById(other).hidden = other !== page;
          document.getElementById(otherId).classList.toggle('active', other === page);
        }
        const frame = document.getElementById('report-frame');
        if (page === 'report' && !frame.getAttribute('src')) frame.src = '/browse/';
      });
    }
  }

  function dropZone() {
    const drop = document.getElementById('drop');
    const input = document.getElementById('files');
    input.addEventListener('change', () => { addFiles(input.files); input.value = ''; });
    drop.addEventListener('dragover', (e) => { e.preventDefault(); drop.classList.add('over'); });
    drop.addEventListener('dragleave', () => drop.classList.remove('over'));
    drop.addEventListener('drop', (e) => {
      e.preventDefault();
      drop.classList.remove('over');
      addFiles(e.dataTransfer.files);
    });
  }

  const ready = loadInfo();
  tabs();
  dropZone();
})();
