-- Generated from pgproxy/demo_data.py (SeedPlan().sql()); tests/test_docker_files.py checks it is
-- current. The postgres image runs it once, when its data volume is empty.

CREATE TABLE providers (
  id int PRIMARY KEY, npi text NOT NULL UNIQUE, first_name text NOT NULL,
  last_name text NOT NULL, specialty text NOT NULL);
CREATE TABLE patients (
  id int PRIMARY KEY, mrn text NOT NULL UNIQUE, first_name text NOT NULL, last_name text NOT NULL,
  ssn text NOT NULL, dob date NOT NULL, sex text NOT NULL, phone text, email text,
  street text, city text, state text, zip text, created_at timestamptz NOT NULL);
CREATE TABLE encounters (
  id int PRIMARY KEY, patient_id int NOT NULL REFERENCES patients(id),
  provider_id int NOT NULL REFERENCES providers(id), encounter_type text NOT NULL,
  department text NOT NULL, admitted_at timestamp NOT NULL, discharged_at timestamp);
CREATE TABLE diagnoses (
  id int PRIMARY KEY, encounter_id int NOT NULL REFERENCES encounters(id),
  icd10_code text NOT NULL, description text NOT NULL, diagnosed_on date NOT NULL);
CREATE TABLE clinical_notes (
  id int PRIMARY KEY, encounter_id int NOT NULL REFERENCES encounters(id),
  author_id int NOT NULL REFERENCES providers(id), written_at timestamp NOT NULL,
  body text NOT NULL);
CREATE TABLE claims (
  id int PRIMARY KEY, encounter_id int NOT NULL REFERENCES encounters(id),
  patient_id int NOT NULL REFERENCES patients(id), member_id text NOT NULL,
  account_no text NOT NULL, payer text NOT NULL, billed_cents bigint NOT NULL,
  paid_cents bigint NOT NULL, status text NOT NULL, submitted_on date NOT NULL);

INSERT INTO providers
SELECT i, '99' || lpad((i * 7919 % 100000000)::text, 8, '0'),
       (ARRAY['Avery','Blake','Casey','Drew','Emerson','Finley','Gray','Harper','Jordan','Kendall','Logan','Morgan','Parker','Quinn','Riley','Sawyer','Taylor','Rowan','Skyler','Reese'])[1 + (i * 7) % 20], (ARRAY['Testperson','Samplesen','Fakeman','Demoski','Placeholder','Mockridge','Dummyfield','Examplar','Fictitia','Synthwell','Notreal','Madeupson'])[1 + (i * 5) % 12],
       (ARRAY['family medicine','cardiology','endocrinology','pulmonology','emergency medicine','pediatrics','orthopedics','psychiatry'])[1 + i % 8]
FROM generate_series(1, 200) AS i;

INSERT INTO patients
SELECT i, 'MRN-' || lpad(i::text, 7, '0'),
       (ARRAY['Avery','Blake','Casey','Drew','Emerson','Finley','Gray','Harper','Jordan','Kendall','Logan','Morgan','Parker','Quinn','Riley','Sawyer','Taylor','Rowan','Skyler','Reese'])[1 + i % 20], (ARRAY['Testperson','Samplesen','Fakeman','Demoski','Placeholder','Mockridge','Dummyfield','Examplar','Fictitia','Synthwell','Notreal','Madeupson'])[1 + (i / 20) % 12],
       '000-' || lpad((i % 100)::text, 2, '0') || '-' || lpad((i * 7919 % 10000)::text, 4, '0'),
       date '1935-01-01' + (i * 7919 % 30000),
       (ARRAY['F','M','X'])[1 + i % 3],
       '(' || (ARRAY['212','312','415','617','713','206','303','404','503','615','702','801'])[1 + i % 12] || ') 555-01' || lpad((i % 100)::text, 2, '0'),
       lower((ARRAY['Avery','Blake','Casey','Drew','Emerson','Finley','Gray','Harper','Jordan','Kendall','Logan','Morgan','Parker','Quinn','Riley','Sawyer','Taylor','Rowan','Skyler','Reese'])[1 + i % 20] || '.' || (ARRAY['Testperson','Samplesen','Fakeman','Demoski','Placeholder','Mockridge','Dummyfield','Examplar','Fictitia','Synthwell','Notreal','Madeupson'])[1 + (i / 20) % 12])
         || i || '@example.com',
       (1 + i * 37 % 9899)::text || ' ' || (ARRAY['Example','Sample','Placeholder','Fiction','Testing','Mock','Demo'])[1 + i % 7] || ' Street',
       (ARRAY['Springfield','Riverton','Fairview','Lakeside','Greenville','Oakdale','Maplewood'])[1 + i % 7], (ARRAY['MA','OH','OR','TX','WI','NC','CO'])[1 + i % 7],
       lpad((10000 + i * 7919 % 89999)::text, 5, '0'),
       timestamptz '2020-01-01 00:00:00+00' + (i * 7919 % 1576800) * interval '1 minute'
FROM generate_series(1, 10000) AS i;

INSERT INTO encounters
SELECT e, 1 + (e - 1) / 3, 1 + (e * 31) % 200,
       (ARRAY['outpatient','inpatient','emergency','telehealth'])[1 + e % 4],
       (ARRAY['primary care','cardiology','endocrinology','pulmonology','emergency',
              'pediatrics','orthopedics','behavioral health'])[1 + (e * 3) % 8],
       timestamp '2022-01-01 08:00' + (e * 7919 % 26280) * interval '1 hour',
       timestamp '2022-01-01 08:00' + (e * 7919 % 26280) * interval '1 hour'
         + (1 + (CASE WHEN e % 4 = 1 THEN e % 96 ELSE 1 END)) * interval '1 hour'
FROM generate_series(1, 30000) AS e;

INSERT INTO diagnoses
SELECT e.id, e.id, (ARRAY['I10','E11.9','J45.909','M54.50','F41.1','J06.9','K21.9','N39.0','R51.9','Z00.00','E78.5','S93.401A'])[1 + (e.id * 5) % 12],
       (ARRAY['Essential hypertension','Type 2 diabetes mellitus without complications','Unspecified asthma, uncomplicated','Low back pain, unspecified','Generalized anxiety disorder','Acute upper respiratory infection','Gastro-esophageal reflux disease without esophagitis','Urinary tract infection, site not specified','Headache, unspecified','General adult medical examination','Hyperlipidemia, unspecified','Sprain of unspecified ligament of right ankle, initial encounter'])[1 + (e.id * 5) % 12], e.admitted_at::date
FROM encounters e;

INSERT INTO clinical_notes
SELECT k, e.id, e.provider_id, e.admitted_at + interval '45 minutes',
       format('Patient: %s %s (MRN: %s), DOB %s. Seen by Dr. %s %s on %s for %s. '
              '%s %s reports %s; history of %s. Called patient at %s to review results; '
              'instructions sent to %s. Plan: %s. Next visit on %s.',
              p.first_name, p.last_name, p.mrn, to_char(p.dob, 'MM/DD/YYYY'),
              d.first_name, d.last_name, to_char(e.admitted_at, 'FMMonth FMDD, YYYY'),
              (ARRAY['intermittent chest tightness','elevated home glucose readings','wheezing at night','lower back pain after lifting','trouble sleeping and worry','sore throat and cough','heartburn after meals','burning on urination','recurring headaches','an annual physical','a cholesterol follow-up','a twisted right ankle'])[1 + (e.id * 5) % 12],
              CASE p.sex WHEN 'F' THEN 'Ms.' WHEN 'M' THEN 'Mr.' ELSE 'Mx.' END, p.last_name,
              (ARRAY['symptoms improving','no new complaints','mild fatigue','pain rated 4 of 10','good adherence to medication','poor sleep this week'])[1 + e.id % 6],
              (ARRAY['Essential hypertension','Type 2 diabetes mellitus without complications','Unspecified asthma, uncomplicated','Low back pain, unspecified','Generalized anxiety disorder','Acute upper respiratory infection','Gastro-esophageal reflux disease without esophagitis','Urinary tract infection, site not specified','Headache, unspecified','General adult medical examination','Hyperlipidemia, unspecified','Sprain of unspecified ligament of right ankle, initial encounter'])[1 + (e.id * 7) % 12], p.phone, p.email,
              (ARRAY['continue current medication and recheck in 3 months','order HbA1c and lipid panel','start inhaled corticosteroid','physical therapy referral','follow up with behavioral health','supportive care, fluids and rest','trial of proton pump inhibitor','urine culture pending','headache diary for two weeks','age-appropriate screenings ordered','dietary counselling provided','RICE protocol and ankle brace'])[1 + (e.id * 5) % 12],
              to_char(e.admitted_at + interval '90 days', 'MM/DD/YYYY'))
FROM generate_series(1, 10000) AS k
JOIN encounters e ON e.id = 3 * (k - 1) + 1 + k % 3
JOIN patients p ON p.id = e.patient_id
JOIN providers d ON d.id = e.provider_id;

INSERT INTO claims
SELECT c, e.id, e.patient_id,
       'ZZ' || lpad((e.patient_id * 7919 % 1000000000)::text, 9, '0'),
       'ACCT-' || lpad(c::text, 10, '0'),
       (ARRAY['Acme Health Plan (fictional)','Example Mutual','Placeholder Care','Sample State Medicaid','Notreal Medicare Advantage'])[1 + e.patient_id % 5],
       5000 + (c * 7919) % 500000,
       CASE (c * 3) % 5 WHEN 1 THEN 0 WHEN 2 THEN 0
            ELSE (5000 + (c * 7919) % 500000) * 8 / 10 END,
       (ARRAY['paid','denied','pending','paid','paid'])[1 + (c * 3) % 5],
       e.admitted_at::date + c % 20
FROM generate_series(1, 20000) AS c
JOIN encounters e ON e.id = 1 + ((c - 1) * 3) / 2;

CREATE INDEX ON encounters (patient_id);
CREATE INDEX ON diagnoses (encounter_id);
CREATE INDEX ON clinical_notes (encounter_id);
CREATE INDEX ON claims (patient_id);
ANALYZE;
COMMENT ON DATABASE clinic IS 'pgproxy demo seed v1: 10000 patients';
